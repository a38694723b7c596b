//! The synchronisation primitives the flight table is built on.
//!
//! Everything in `inflight.rs` takes its locks, reference counts and atomics
//! from here rather than from `std` directly, so that one seam decides which
//! implementation the core runs on.

pub(crate) use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
pub(crate) use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// Locks `mutex`, ignoring poisoning.
///
/// No code of this crate panics while it holds a lock; user code that runs
/// under a shard lock (the key's `Hash` and `Eq`) can, and when it does the
/// map is left as it was before the lookup, so the data stays consistent.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
