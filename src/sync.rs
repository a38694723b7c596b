//! The synchronisation primitives the flight table is built on.
//!
//! Everything in `inflight` takes its locks, reference counts and atomics
//! from here rather than from `std` directly, so that the loom models (built
//! with `--cfg singleflight_loom`) can see and permute every one of them.
//!
//! NOTE: the cfg is not plain `loom` because tokio reads that one too and
//! drops its networking under it, which the dev-dependencies need.

#[cfg(singleflight_loom)]
pub(crate) use loom::sync::atomic::{AtomicBool, AtomicU64, Ordering};
#[cfg(singleflight_loom)]
pub(crate) use loom::sync::{Arc, Mutex, MutexGuard};
#[cfg(not(singleflight_loom))]
pub(crate) use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
#[cfg(not(singleflight_loom))]
pub(crate) use std::sync::{Arc, Mutex, MutexGuard};

use std::sync::PoisonError;

/// Locks `mutex`, ignoring poisoning.
///
/// No code of this crate panics while it holds a lock; user code that runs
/// under a shard lock (the key's `Hash` and `Eq`) can, and when it does the
/// map is left as it was before the lookup, so the data stays consistent.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
