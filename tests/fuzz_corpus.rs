//! The fuzz corpus as a regular test: every input kept in `fuzz/corpus/http`
//! and `fuzz/corpus/grpc` runs through the same checks as the fuzz targets
//! (`tests/support/fuzzing/`), so bad input found once stays fixed.
//!
//! To fuzz for more, see `fuzz/README.md`.
#![cfg(all(feature = "http", feature = "grpc"))]

#[path = "support/fuzzing/mod.rs"]
mod fuzzing;

use std::panic;
use std::path::{Path, PathBuf};

/// Runs `check` on every file in `fuzz/corpus/<target>`, and fails naming
/// each input that failed.
fn run_corpus(target: &str, check: fn(&[u8])) {
    // Every input, in a stable order.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut inputs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|error| panic!("{}: {error}", dir.display()))
        .map(|entry| entry.expect("a readable corpus entry").path())
        .collect();
    inputs.sort();
    assert!(!inputs.is_empty(), "{}: an empty corpus", dir.display());

    // Each on its own, so that one failure does not hide another.
    let mut failed = Vec::new();
    for input in &inputs {
        let data = std::fs::read(input).expect("a readable corpus file");
        if panic::catch_unwind(|| check(&data)).is_err() {
            failed.push(
                input
                    .file_name()
                    .expect("a file")
                    .to_string_lossy()
                    .into_owned(),
            );
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} {target} inputs failed: {failed:?}",
        failed.len(),
        inputs.len()
    );
}

#[test]
fn every_http_corpus_input_passes_the_checks() {
    run_corpus("http", fuzzing::check_http);
}

#[test]
fn every_grpc_corpus_input_passes_the_checks() {
    run_corpus("grpc", fuzzing::check_grpc);
}
