//! Fuzzes the gRPC layer: request bodies framed as gRPC (one message or
//! several, truncated frames, wrong lengths, compression flags, trailing
//! garbage, trailers, early failures), cut into frames with waits between
//! them, from a leader and its followers, over a scripted inner service.
//! The checks live in `tests/support/fuzzing/`, shared with the corpus test
//! `tests/fuzz_corpus.rs`.
//!
//! From the repository root (cargo-fuzz needs nightly flags, which
//! `RUSTC_BOOTSTRAP=1` lets a stable toolchain accept):
//!
//! ```sh
//! cargo install cargo-fuzz
//! RUSTC_BOOTSTRAP=1 cargo fuzz run grpc /tmp/fuzz-grpc fuzz/corpus/grpc -- -max_total_time=120
//! ```
//!
//! New inputs go to `/tmp/fuzz-grpc`; `fuzz/corpus/grpc` is only read.
#![no_main]

#[path = "../../tests/support/fuzzing/mod.rs"]
mod fuzzing;

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzzing::check_grpc(data));
