#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| watchkeeper_fuzz::job_protocol(data));
