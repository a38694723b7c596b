//! The flight table: the crate's only shared mutable state.
//!
//! A [`Table`] maps keys to the [`Flight`]s in progress. Each caller holds a
//! [`Ticket`] on one flight. The ticket whose seat is `Driving` owns the
//! inner call and polls it in its own task; every other ticket waits with a
//! registered waker and is woken once, when the outcome is published. A
//! driver that leaves parks the call in the flight and wakes one waiter to
//! take it up, so the call survives as long as anyone waits for it.
//!
//! Lock order: a shard's map, then a flight's state. No lock is held while
//! the inner call is polled or dropped, or while a waker runs. An abandoned
//! call is dropped just after its key is freed, for the same reason: a
//! caller arriving in that instant may start a new call while the old one's
//! destructor still runs.

#[cfg(all(test, singleflight_loom))]
mod loom;
mod table;
mod wakers;

use std::future::Future;
use std::hash::Hash;
use std::mem;
use std::panic::{self, AssertUnwindSafe};
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::error::Error;
use crate::sync::{lock, Arc, AtomicBool, Mutex, Ordering};

use self::table::Counters;
pub(crate) use self::table::Table;
use self::wakers::Wakers;

/// The inner call of a flight, boxed so that driving it can pass between
/// waiters.
pub(crate) type Call<T> = Pin<Box<dyn Future<Output = Result<T, Error>> + Send>>;

/// What a waiter gets: the outcome, and whether it went to more than one.
pub(crate) type Delivery<T> = (Result<T, Error>, bool);

/// One inner call, shared by every caller whose key equals `key`.
pub(crate) struct Flight<K, T> {
    key: K,
    hash: u64,
    /// Runs the call to completion in a task of its own once every waiter
    /// has left; `None` unless the leader's group asked for it. A function
    /// pointer, so that leaving needs none of the bounds spawning does.
    detach: Option<fn(Ticket<K, T>)>,
    /// Whether the shard's map points at this flight. Read and written only
    /// with the shard's lock held.
    registered: AtomicBool,
    state: Mutex<State<T>>,
}

/// The part of a flight its waiters change, guarded by the flight's mutex.
struct State<T> {
    /// Live tickets: the leader, the followers and a detached driver.
    /// Raised by `join` (under the shard lock too), lowered by each ticket
    /// as it takes the outcome or leaves.
    waiters: usize,
    /// Followers that ever joined; read at publish to tell the driver whether
    /// its outcome was shared.
    followers: usize,
    /// Wakers of waiters that wait for the outcome. Emptied at publish.
    wakers: Wakers,
    /// The inner call while no waiter drives it: its driver left and a
    /// follower has yet to take it up. Set by `leave`, taken by `poll`.
    parked: Option<Call<T>>,
    /// The published outcome, until the last waiter took it.
    outcome: Option<Result<T, Error>>,
    /// Set once the outcome is published or the flight abandoned.
    done: bool,
}

/// A caller's place in a flight. Dropping it leaves the flight.
pub(crate) struct Ticket<K, T> {
    table: Arc<Table<K, T>>,
    flight: Arc<Flight<K, T>>,
    seat: Seat<T>,
    /// A detached driver is no caller: it is not counted as a waiter in the
    /// stats, and it never detaches again.
    detached: bool,
}

enum Seat<T> {
    /// Owns the inner call; `None` only between `join` and `start`.
    Driving(Option<Call<T>>),
    /// Waits for the outcome with a waker in this slot.
    Waiting(usize),
    /// Took its outcome.
    Left,
}

// --- impl Ticket ---

impl<K, T: Clone> Ticket<K, T> {
    fn new(table: Arc<Table<K, T>>, flight: Arc<Flight<K, T>>, seat: Seat<T>) -> Self {
        Self {
            table,
            flight,
            seat,
            detached: false,
        }
    }

    /// Starts the leader's call, inside the flight's span when tracing. A
    /// panic while making it becomes the flight's outcome, delivered at the
    /// first poll.
    pub(crate) fn start<F>(&mut self, make: impl FnOnce() -> F)
    where
        F: Future<Output = Result<T, Error>> + Send + 'static,
        T: Send + 'static,
    {
        debug_assert!(
            matches!(self.seat, Seat::Driving(None)),
            "start by a non-leader"
        );
        #[cfg(feature = "tracing")]
        let span = tracing::trace_span!("singleflight.flight", key_hash = self.flight.hash);
        #[cfg(feature = "tracing")]
        let make = || tracing::Instrument::instrument(span.in_scope(make), span.clone());

        let call: Call<T> = match panic::catch_unwind(AssertUnwindSafe(make)) {
            Ok(call) => Box::pin(call),
            Err(payload) => {
                self.counters().panics.fetch_add(1, Ordering::Relaxed);
                Box::pin(std::future::ready(Err(Error::panicked(&*payload))))
            }
        };
        self.seat = Seat::Driving(Some(call));
    }

    /// Drives the call or waits for its outcome.
    ///
    /// # Panics
    ///
    /// When polled again after it returned the outcome.
    pub(crate) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Delivery<T>> {
        loop {
            match &mut self.seat {
                // The driver polls the inner call in its own task. A panic in
                // it is caught here and becomes everyone's outcome.
                Seat::Driving(Some(call)) => {
                    let polled = panic::catch_unwind(AssertUnwindSafe(|| call.as_mut().poll(cx)));
                    let outcome = match polled {
                        Ok(Poll::Pending) => return Poll::Pending,
                        Ok(Poll::Ready(outcome)) => outcome,
                        Err(payload) => {
                            self.counters().panics.fetch_add(1, Ordering::Relaxed);
                            Err(Error::panicked(&*payload))
                        }
                    };
                    return Poll::Ready(self.publish(outcome));
                }
                Seat::Driving(None) => panic!("flight polled before its call was started"),

                // A waiter takes the outcome, takes up a parked call, or
                // registers to be woken.
                Seat::Waiting(slot) => {
                    let slot = *slot;
                    let mut state = lock(&self.flight.state);
                    if state.done {
                        let delivery = state.take_outcome(slot);
                        drop(state);
                        self.seat = Seat::Left;
                        self.counters().waiters.fetch_sub(1, Ordering::Relaxed);
                        return Poll::Ready(delivery);
                    }
                    if let Some(call) = state.parked.take() {
                        state.wakers.remove(slot);
                        drop(state);
                        self.seat = Seat::Driving(Some(call));
                        continue;
                    }
                    state.wakers.register(slot, cx.waker());
                    return Poll::Pending;
                }
                Seat::Left => panic!("flight polled after it delivered its outcome"),
            }
        }
    }

    /// Hands the driver's outcome to every waiter and frees the key.
    fn publish(&mut self, outcome: Result<T, Error>) -> Delivery<T> {
        self.seat = Seat::Left;

        // Free the key first: from here on, a new caller starts a new flight.
        let shard = self.table.shard(self.flight.hash);
        Table::unlink(&mut lock(&shard.map), &self.flight);

        // Then store the outcome for the waiters that joined before.
        let (wakers, shared) = {
            let mut state = lock(&self.flight.state);
            state.waiters -= 1;
            state.done = true;
            if state.waiters > 0 {
                let copy = match &outcome {
                    Ok(value) => Ok(value.clone()),
                    Err(error) => Err(error.share()),
                };
                state.outcome = Some(copy);
            }
            (mem::take(&mut state.wakers), state.followers > 0)
        };
        shard.counters.flights.fetch_sub(1, Ordering::Relaxed);
        if !self.detached {
            shard.counters.waiters.fetch_sub(1, Ordering::Relaxed);
        }

        #[cfg(feature = "tracing")]
        if outcome.is_err() && shared {
            tracing::debug!(
                key_hash = self.flight.hash,
                "shared call failed; fanning out"
            );
        }

        // Wake outside the lock: a waker may run arbitrary code.
        wakers.wake_all();
        (outcome, shared)
    }
}

impl<K, T> Ticket<K, T> {
    fn counters(&self) -> &Counters {
        &self.table.shard(self.flight.hash).counters
    }

    /// Leaves the flight before taking its outcome.
    fn leave(&mut self) {
        let seat = mem::replace(&mut self.seat, Seat::Left);
        let shard = self.table.shard(self.flight.hash);
        if !self.detached {
            shard.counters.waiters.fetch_sub(1, Ordering::Relaxed);
        }
        let mut map = lock(&shard.map);
        let mut state = lock(&self.flight.state);
        state.waiters -= 1;
        let call = match seat {
            Seat::Waiting(slot) => {
                state.wakers.remove(slot);
                None
            }
            Seat::Driving(call) => call,
            Seat::Left => unreachable!("left twice"),
        };

        // Finished already: free the outcome with the last waiter.
        if state.done {
            let outcome = if state.waiters == 0 {
                state.outcome.take()
            } else {
                None
            };
            drop((state, map));
            drop(outcome);
            return;
        }

        // Others still wait: park the call for one of them to take up.
        if let Some(call) = call {
            debug_assert!(state.parked.is_none(), "two drivers of one flight");
            state.parked = Some(call);
            #[cfg(feature = "tracing")]
            tracing::trace!(
                key_hash = self.flight.hash,
                "driver left; handing the call over"
            );
        }
        if state.waiters > 0 {
            let next = if state.parked.is_some() {
                state.wakers.take_one()
            } else {
                None
            };
            drop((state, map));
            if let Some(waker) = next {
                waker.wake();
            }
            return;
        }

        // The last waiter left. Either a detached driver finishes the call, or
        // the call is dropped and the key freed.
        let call = state.parked.take();
        debug_assert!(call.is_some(), "no driver and no parked call");
        if let (Some(spawn), false) = (self.flight.detach, self.detached) {
            // The detached driver counts as a waiter, so new callers join it.
            state.waiters = 1;
            drop((state, map));
            spawn(Ticket {
                table: Arc::clone(&self.table),
                flight: Arc::clone(&self.flight),
                seat: Seat::Driving(call),
                detached: true,
            });
            return;
        }
        state.done = true;
        Table::unlink(&mut map, &self.flight);
        #[cfg(feature = "tracing")]
        tracing::trace!(
            key_hash = self.flight.hash,
            "every waiter left; dropping the call"
        );
        drop((state, map));
        shard.counters.flights.fetch_sub(1, Ordering::Relaxed);
        shard.counters.abandoned.fetch_add(1, Ordering::Relaxed);

        // Drop the call last, with no lock held: its destructor is user code.
        drop(call);
    }
}

impl<K, T> Drop for Ticket<K, T> {
    fn drop(&mut self) {
        if !matches!(self.seat, Seat::Left) {
            self.leave();
        }
    }
}

// --- impl State ---

impl<T: Clone> State<T> {
    fn new() -> Self {
        Self {
            waiters: 1,
            followers: 0,
            wakers: Wakers::default(),
            parked: None,
            outcome: None,
            done: false,
        }
    }

    /// Takes this waiter's copy of the published outcome: the last one out
    /// takes the stored value itself.
    fn take_outcome(&mut self, slot: usize) -> Delivery<T> {
        self.wakers.remove(slot);
        self.waiters -= 1;
        let outcome = if self.waiters == 0 {
            self.outcome.take()
        } else {
            self.outcome.as_ref().map(|outcome| match outcome {
                Ok(value) => Ok(value.clone()),
                Err(error) => Err(error.share()),
            })
        };
        (
            outcome.expect("a finished flight with waiters keeps its outcome"),
            true,
        )
    }
}

/// Spawns a detached driver on the current tokio runtime. Outside one, the
/// driver is dropped, and with it the call: the flight is abandoned.
fn spawn_detached<K, T>(driver: Ticket<K, T>)
where
    K: Hash + Eq + Send + Sync + 'static,
    T: Clone + Send + 'static,
{
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(Detached(driver));
    }
}

/// A driver that runs a call nobody waits for any more, in its own task.
struct Detached<K, T>(Ticket<K, T>);

impl<K, T: Clone> Future for Detached<K, T> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.0.poll(cx).map(drop)
    }
}
