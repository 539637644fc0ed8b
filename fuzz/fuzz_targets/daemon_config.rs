#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| watchkeeper_fuzz::daemon_config(data));
