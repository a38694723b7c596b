//! Loom models of the flight table: every interleaving of two or three
//! threads around one key, checking one call per key, that each waiter gets
//! its own flight's outcome, and that the map ends empty.
//!
//! Run as CI does, with `RUSTFLAGS="--cfg singleflight_loom"
//! LOOM_MAX_PREEMPTIONS=3 cargo test --release --lib --target-dir target/loom
//! loom_`: the preemption bound keeps the models to seconds, and the
//! directory of their own keeps the usual builds from being redone.

use std::future::{poll_fn, Future};
use std::task::Poll;

use loom::future::{block_on, AtomicWaker};
use loom::sync::atomic::{AtomicBool, AtomicUsize};
use loom::thread;

use super::{Table, Ticket};
use crate::error::Error;
use crate::sync::{Arc, Ordering};

/// A call that finishes with `value` once its gate opens, counting how many
/// calls were made and how many are alive.
#[derive(Default)]
struct Backend {
    open: AtomicBool,
    waker: AtomicWaker,
    made: AtomicUsize,
    live: AtomicUsize,
}

struct Alive(Arc<Backend>);

impl Drop for Alive {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Backend {
    fn call(this: &Arc<Self>, value: u32) -> impl Future<Output = Result<u32, Error>> + Send {
        this.made.fetch_add(1, Ordering::SeqCst);
        this.live.fetch_add(1, Ordering::SeqCst);
        let alive = Alive(Arc::clone(this));
        poll_fn(move |cx| {
            // An open gate answers at once, leaving the one waker slot to a
            // call that still waits.
            let backend = &alive.0;
            if backend.open.load(Ordering::SeqCst) {
                return Poll::Ready(Ok(value));
            }
            backend.waker.register(cx.waker().clone());
            if backend.open.load(Ordering::SeqCst) {
                Poll::Ready(Ok(value))
            } else {
                Poll::Pending
            }
        })
    }

    fn open(&self) {
        self.open.store(true, Ordering::SeqCst);
        self.waker.wake();
    }
}

type Delivered = (Result<u32, Error>, bool);

/// Joins key 1; a new leader starts a call that answers `value` at once.
fn arrive(table: &Arc<Table<u8, u32>>, backend: &Arc<Backend>, value: u32) -> Ticket<u8, u32> {
    let (mut ticket, leads) = table.join(1, false);
    if leads {
        backend.open.store(true, Ordering::SeqCst);
        ticket.start(|| Backend::call(backend, value));
    }
    ticket
}

fn leader(table: &Arc<Table<u8, u32>>, backend: &Arc<Backend>) -> Ticket<u8, u32> {
    let (mut ticket, leads) = table.join(1, false);
    assert!(leads, "the first caller leads");
    ticket.start(|| Backend::call(backend, 7));
    ticket
}

fn wait(mut ticket: Ticket<u8, u32>) -> Delivered {
    block_on(poll_fn(|cx| ticket.poll(cx)))
}

fn value(delivered: &Delivered) -> u32 {
    *delivered.0.as_ref().expect("the call succeeds")
}

fn assert_idle(table: &Table<u8, u32>, backend: &Backend) {
    assert_eq!(table.len(), 0, "the map ends empty");
    assert_eq!(table.entries(), 0, "no entry outlives its flight's callers");
    let stats = table.stats();
    assert_eq!(
        (stats.flights, stats.waiters),
        (0, 0),
        "no flight or waiter is left"
    );
    assert_eq!(
        backend.live.load(Ordering::SeqCst),
        0,
        "no call is left alive"
    );
}

#[test]
fn loom_leader_completes_while_a_follower_joins() {
    loom::model(|| {
        let table = Arc::new(Table::new());
        let backend = Arc::new(Backend::default());
        let lead = leader(&table, &backend);

        // A second caller arrives while the leader finishes.
        let other = {
            let (table, backend) = (Arc::clone(&table), Arc::clone(&backend));
            thread::spawn(move || wait(arrive(&table, &backend, 2)))
        };
        backend.open();
        let led = wait(lead);
        let other = other.join().expect("no panic");

        // It joined the flight and shares its outcome, or came after and
        // made its own call.
        assert_eq!(value(&led), 7);
        match value(&other) {
            7 => assert!(led.1 && other.1, "both know the outcome was shared"),
            2 => assert!(!led.1, "the leader's outcome went to no one else"),
            v => panic!("unexpected value {v}"),
        }
        assert_idle(&table, &backend);
    });
}

#[test]
fn loom_leader_dropped_while_a_follower_waits_hands_the_call_over() {
    loom::model(|| {
        let table = Arc::new(Table::new());
        let backend = Arc::new(Backend::default());
        let lead = leader(&table, &backend);
        let (follower, leads) = table.join(1, false);
        assert!(!leads);

        // The leader leaves while the follower waits and the call finishes.
        let leaver = thread::spawn(move || drop(lead));
        let waiter = thread::spawn(move || wait(follower));
        backend.open();
        leaver.join().expect("no panic");
        let got = waiter.join().expect("no panic");

        // The follower gets the one call's outcome.
        assert_eq!(value(&got), 7);
        assert_eq!(
            backend.made.load(Ordering::SeqCst),
            1,
            "the call was not restarted"
        );
        assert_idle(&table, &backend);
    });
}

#[test]
fn loom_last_waiter_leaves_while_a_new_caller_arrives() {
    loom::model(|| {
        let table = Arc::new(Table::new());
        let backend = Arc::new(Backend::default());
        let lead = leader(&table, &backend);

        // The only waiter leaves as another caller arrives.
        let leaver = thread::spawn(move || drop(lead));
        let comer = {
            let (table, backend) = (Arc::clone(&table), Arc::clone(&backend));
            thread::spawn(move || wait(arrive(&table, &backend, 2)))
        };
        backend.open();
        leaver.join().expect("no panic");
        let got = comer.join().expect("no panic");

        // Either the newcomer took up the old call, or it was dropped and
        // the newcomer made a new one.
        let made = backend.made.load(Ordering::SeqCst);
        match value(&got) {
            7 => assert_eq!(made, 1, "the old call was taken up, not restarted"),
            2 => assert_eq!(made, 2, "the abandoned call was replaced once"),
            v => panic!("unexpected value {v}"),
        }
        assert_idle(&table, &backend);
    });
}

#[test]
fn loom_forget_during_a_flight_keeps_its_waiters() {
    loom::model(|| {
        let table = Arc::new(Table::new());
        let backend = Arc::new(Backend::default());
        let lead = leader(&table, &backend);
        let (follower, _) = table.join(1, false);

        // One thread forgets the key and calls again; another waits.
        let again = {
            let (table, backend) = (Arc::clone(&table), Arc::clone(&backend));
            thread::spawn(move || {
                table.forget(&1);
                wait(arrive(&table, &backend, 2))
            })
        };
        let waiter = thread::spawn(move || wait(follower));
        backend.open();
        let led = wait(lead);

        // The old waiters get the old outcome; the caller after forget a new one.
        assert_eq!(value(&led), 7);
        assert_eq!(value(&waiter.join().expect("no panic")), 7);
        assert_eq!(value(&again.join().expect("no panic")), 2);
        assert_idle(&table, &backend);
    });
}

#[test]
fn loom_a_panicking_call_reaches_every_waiter() {
    loom::model(|| {
        let table: Arc<Table<u8, u32>> = Arc::new(Table::new());
        let (mut lead, _) = table.join(1, false);
        lead.start(|| async { panic!("boom") });
        let (follower, _) = table.join(1, false);

        // The follower waits in its own thread while the leader drives.
        let waiter = thread::spawn(move || wait(follower));
        let led = wait(lead);
        let got = waiter.join().expect("the panic stays inside the flight");

        // Both see the panic as an error; the key is free.
        for (outcome, _) in [led, got] {
            let error = outcome.expect_err("the call panicked");
            assert_eq!(error.panic_message(), Some("boom"));
        }
        assert_eq!(table.len(), 0);
        assert_eq!(table.stats().panics, 1);
    });
}
