//! Fuzzes the HTTP layer: arbitrary requests (method, URI, headers, body)
//! from a leader and its followers, over a scripted inner service whose
//! responses have arbitrary status, headers (`Set-Cookie`, `Vary`, odd
//! values), bodies in frames, trailers and failures. The checks live in
//! `tests/support/fuzzing/`, shared with the corpus test
//! `tests/fuzz_corpus.rs`.
//!
//! From the repository root (cargo-fuzz needs nightly flags, which
//! `RUSTC_BOOTSTRAP=1` lets a stable toolchain accept):
//!
//! ```sh
//! cargo install cargo-fuzz
//! RUSTC_BOOTSTRAP=1 cargo fuzz run http /tmp/fuzz-http fuzz/corpus/http -- -max_total_time=120
//! ```
//!
//! New inputs go to `/tmp/fuzz-http`; `fuzz/corpus/http` is only read.
#![no_main]

#[path = "../../tests/support/fuzzing/mod.rs"]
mod fuzzing;

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzzing::check_http(data));
