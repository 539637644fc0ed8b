//! Replays every input of `fuzz/corpus/<target>/` through its target: what the fuzzer found
//! (and what it started from) stays checked by an ordinary `cargo test`.

use std::path::PathBuf;

fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target)
}

#[test]
fn every_corpus_input_passes_its_target() {
    for (target, run) in watchkeeper_fuzz::TARGETS {
        let dir = corpus_dir(target);
        let mut inputs: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        inputs.sort();
        assert!(
            inputs.len() >= 5,
            "{target}: only {} inputs in {}",
            inputs.len(),
            dir.display()
        );
        for input in inputs {
            let data = std::fs::read(&input).unwrap();
            let outcome = std::panic::catch_unwind(|| run(&data));
            assert!(outcome.is_ok(), "{target}: {} fails", input.display());
        }
    }
}

#[test]
fn every_target_survives_prefixes_of_its_corpus() {
    // Truncated inputs are the commonest damage (a torn file, a cut line).
    for (target, run) in watchkeeper_fuzz::TARGETS {
        for entry in std::fs::read_dir(corpus_dir(target)).unwrap() {
            let data = std::fs::read(entry.unwrap().path()).unwrap();
            for cut in (0..data.len()).step_by(data.len() / 16 + 1) {
                run(&data[..cut]);
            }
        }
    }
}
