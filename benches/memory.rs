//! Memory of every implementation, counted by a global allocator that
//! tallies each allocation: bytes and allocations per uncoalesced call,
//! bytes per flight, bytes per waiting follower, and the bytes left behind
//! after 10,000 cancelled and 10,000 panicked flights.
//!
//! Futures are polled by hand with a no-op waker on this one thread, so no
//! runtime allocates behind the counts. Run with `cargo bench --bench
//! memory`. Prints markdown tables.

// A scenario binary: the tables it prints are its output.
#![allow(clippy::print_stdout)]

#[macro_use]
mod support;

use std::alloc::System;
use std::future::Future;
use std::panic::{self, AssertUnwindSafe};
use std::pin::Pin;
use std::task::{Context, Poll};

use stats_alloc::{StatsAlloc, INSTRUMENTED_SYSTEM};

use support::{
    print_table, AsyncSingleflight, Backend, Bare, Caller, Contender, Mode, OursGroup, OursService,
    Resilience, RsSingleflight, SingleflightAsync, Uniflight,
};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Flights in progress at once when measuring bytes per flight.
const FLIGHTS: u64 = 1_000;
/// Followers of one flight when measuring bytes per follower.
const FOLLOWERS: usize = 1_000;
/// Cancelled, then panicked, flights when looking for leftovers.
const FAILED: u64 = 10_000;

fn main() {
    // Panics are part of the run; keep them off the terminal.
    panic::set_hook(Box::new(|_| {}));

    let misses = each_contender!(per_miss());
    let flights = each_contender!(per_flight());
    let followers = each_contender!(per_follower());
    let leftovers = each_contender!(left_behind());

    let mut names: Vec<&str> = misses.iter().map(|(name, _)| *name).collect();
    let mut rows = vec![
        row("allocations per uncoalesced call", &misses, |m| {
            format!("{:.2}", m.0)
        }),
        row("bytes allocated per uncoalesced call", &misses, |m| {
            format!("{:.0}", m.1)
        }),
        row("caller future, bytes (size_of)", &flights, |f| {
            f.0.to_string()
        }),
        row(
            "heap bytes per flight, tables grown from empty (beyond the caller future)",
            &flights,
            |f| format!("{:.0}", f.1[0]),
        ),
        row(
            "heap bytes per flight, again after the first 1,000 ended",
            &flights,
            |f| format!("{:.0}", f.1[1]),
        ),
        row(
            "heap bytes per waiting follower (beyond its future)",
            &followers,
            |f| format!("{f:.0}"),
        ),
        row(
            "bytes left after 10,000 cancelled flights",
            &leftovers,
            |l| l.0.to_string(),
        ),
        row(
            "bytes left after 10,000 panicked flights",
            &leftovers,
            |l| l.1.to_string(),
        ),
    ];

    // The bare service, for reference: what the backend's own call costs.
    names.push(Bare::NAME);
    let bare_miss = per_miss::<Bare>();
    let bare_flight = per_flight::<Bare>();
    rows[0].1.push(format!("{:.2}", bare_miss.0));
    rows[1].1.push(format!("{:.0}", bare_miss.1));
    rows[2].1.push(bare_flight.0.to_string());
    rows[3].1.push(format!("{:.0}", bare_flight.1[0]));
    rows[4].1.push(format!("{:.0}", bare_flight.1[1]));
    rows[5].1.push(format!("{:.0}", per_follower::<Bare>()));
    rows[6].1.push("–".to_owned());
    rows[7].1.push("–".to_owned());

    let title = format!(
        "Memory: {FLIGHTS} flights, {FOLLOWERS} followers, {FAILED} cancelled and \
         {FAILED} panicked flights (bare service: no coalescing, for reference)"
    );
    print_table(&title, &names, &rows);
}

type Row = (String, Vec<String>);

fn row<T>(metric: &str, results: &[(&str, T)], cell: impl Fn(&T) -> String) -> Row {
    (
        metric.to_owned(),
        results.iter().map(|(_, r)| cell(r)).collect(),
    )
}

/// Bytes currently allocated by the whole process.
fn live() -> i64 {
    let stats = GLOBAL.stats();
    stats.bytes_allocated as i64 - stats.bytes_deallocated as i64
}

/// Allocations per call, and bytes allocated per call, with every call a
/// miss that completes at once.
fn per_miss<C: Contender>() -> (f64, f64) {
    let contender = C::new(Backend::new(Mode::Immediate));
    let mut caller = contender.caller();
    let mut calls = |keys: std::ops::Range<u64>| {
        for key in keys {
            let call = std::pin::pin!(caller.call(key));
            assert!(poll(call).is_ready(), "{} did not complete", C::NAME);
        }
    };
    calls(0..100);
    let before = GLOBAL.stats();
    calls(100..10_100);
    let after = GLOBAL.stats();
    let allocations =
        (after.allocations + after.reallocations) - (before.allocations + before.reallocations);
    let bytes = after.bytes_allocated - before.bytes_allocated;
    (allocations as f64 / 10_000.0, bytes as f64 / 10_000.0)
}

/// The size of a caller's future, and the heap bytes each of `FLIGHTS`
/// flights in progress takes beyond it: in a first round, with every table
/// grown from empty (so the bytes include the table's storage), and in a
/// second round of the same shape, after the first has ended (a table that
/// kept its capacity counts none of it again).
fn per_flight<C: Contender>() -> (usize, [f64; 2]) {
    let backend = Backend::new(Mode::Gated);
    let contender = C::new(backend);
    let mut callers: Vec<C::Caller> = (0..FLIGHTS).map(|_| contender.caller()).collect();
    let mut measured = (0, [0.0; 2]);
    for round in 0..2 {
        backend.gate().close();
        let before = live();
        let mut calls: Vec<_> = callers
            .iter_mut()
            .zip(0..FLIGHTS)
            .map(|(caller, key)| Box::pin(caller.call(key)))
            .collect();
        for call in &mut calls {
            assert!(poll(call.as_mut()).is_pending(), "{} did not wait", C::NAME);
        }
        let size = std::mem::size_of_val(calls[0].as_ref().get_ref());
        let per_call = (live() - before) as f64 / FLIGHTS as f64;
        let vec = std::mem::size_of_val(&calls[0]) * calls.capacity();
        measured.0 = size;
        measured.1[round] = per_call - size as f64 - vec as f64 / FLIGHTS as f64;
        backend.gate().open();
        finish(&mut calls, C::NAME);
    }
    measured
}

/// The heap bytes each of `FOLLOWERS` followers of one flight takes beyond
/// its own future.
fn per_follower<C: Contender>() -> f64 {
    let backend = Backend::new(Mode::Gated);
    let contender = C::new(backend);
    let mut leader = contender.caller();
    let mut callers: Vec<C::Caller> = (0..FOLLOWERS).map(|_| contender.caller()).collect();
    let mut lead = Box::pin(leader.call(7));
    assert!(poll(lead.as_mut()).is_pending(), "{} did not wait", C::NAME);

    let before = live();
    let mut calls: Vec<_> = callers
        .iter_mut()
        .map(|caller| Box::pin(caller.call(7)))
        .collect();
    for call in &mut calls {
        assert!(poll(call.as_mut()).is_pending(), "{} did not wait", C::NAME);
    }
    let size = std::mem::size_of_val(calls[0].as_ref().get_ref());
    let vec = std::mem::size_of_val(&calls[0]) * calls.capacity();
    let per_follower = (live() - before - vec as i64) as f64 / FOLLOWERS as f64 - size as f64;

    backend.gate().open();
    calls.insert(0, lead);
    finish(&mut calls, C::NAME);
    per_follower
}

/// The bytes still allocated after `FAILED` flights whose callers all left
/// before the end, then after `FAILED` flights whose call panicked. Each
/// flight has a leader and a follower, on a key of its own.
fn left_behind<C: Contender>() -> (i64, i64) {
    let backend = Backend::new(Mode::Gated);
    let cancelled = C::new(backend);
    let mut callers = (cancelled.caller(), cancelled.caller());
    let mut cancel = |key: u64| {
        let mut lead = Box::pin(callers.0.call(key));
        let mut follow = Box::pin(callers.1.call(key));
        let _ = poll(lead.as_mut());
        let _ = poll(follow.as_mut());
        drop(lead);
        let _ = poll(follow.as_mut());
    };
    // Warm up on keys of their own, enough to touch every shard of a map.
    (FAILED..FAILED + 256).for_each(&mut cancel);
    let before = live();
    (0..FAILED).for_each(&mut cancel);
    let after_cancelled = live() - before;

    let backend = Backend::new(Mode::GatedPanic);
    let panicked = C::new(backend);
    let mut callers = (panicked.caller(), panicked.caller());
    let mut panic = |key: u64| {
        backend.gate().close();
        let mut lead = Box::pin(callers.0.call(key));
        let mut follow = Box::pin(callers.1.call(key));
        let _ = poll(lead.as_mut());
        let _ = poll(follow.as_mut());
        backend.gate().open();
        let _ = panic::catch_unwind(AssertUnwindSafe(|| poll(lead.as_mut())));
        drop(lead);
        for _ in 0..3 {
            let polled = panic::catch_unwind(AssertUnwindSafe(|| poll(follow.as_mut())));
            if !matches!(polled, Ok(Poll::Pending)) {
                break;
            }
        }
        let _ = backend.take_returned();
    };
    (FAILED..FAILED + 256).for_each(&mut panic);
    let before = live();
    (0..FAILED).for_each(&mut panic);
    (after_cancelled, live() - before)
}

/// Polls every call until it completes, up to a few rounds.
fn finish<F: Future>(calls: &mut Vec<Pin<Box<F>>>, name: &str) {
    for _ in 0..3 {
        calls.retain_mut(|call| poll(call.as_mut()).is_pending());
    }
    assert!(calls.is_empty(), "{name} left calls unfinished");
}

/// Polls `fut` once with a waker that does nothing.
fn poll<F: Future + ?Sized>(fut: Pin<&mut F>) -> Poll<F::Output> {
    let waker = futures::task::noop_waker();
    fut.poll(&mut Context::from_waker(&waker))
}
