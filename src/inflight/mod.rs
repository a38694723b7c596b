//! The flight table: the crate's only shared mutable state.
//!
//! A [`Table`] maps keys to the flights in progress. Each caller holds a
//! [`Ticket`] on one flight.
//!
//! A flight starts *lone*: its leader's entry in the shard's map holds the
//! call between the leader's polls, and nothing else is allocated for it.
//! The leader takes the call out to poll it and parks it again, or frees the
//! key when it finishes. The first follower to join turns the flight
//! *shared*: the call and the leader's waker move into a [`Flight`] of their
//! own, which the leader finds in its entry at its next poll.
//!
//! In a shared flight, a [`Driver`] task of the flight's own polls the
//! call, and every waiter waits with a registered waker and is woken once,
//! when the outcome is published. Where no task can be spawned, the callers
//! take turns instead: the one the call wakes polls it, and one that leaves
//! wakes another to take it up, so the call survives as long as anyone
//! waits for it.
//!
//! Lock order: a shard's map, then a flight's state. No lock is held while
//! the inner call is made, polled or dropped, or while a waker runs. An
//! abandoned call is dropped just after its key is freed, for the same
//! reason: a caller arriving in that instant may start a new call while the
//! old one's destructor still runs.

#[cfg(all(test, singleflight_loom))]
mod loom;
mod table;
mod wakers;

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::hash::Hash;
use std::mem;
use std::panic::{self, AssertUnwindSafe};
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use crate::error::Error;
use crate::sync::{lock, Arc, AtomicBool, Mutex, Ordering};

pub(crate) use self::table::Table;
use self::table::{Counters, Entry, Flights, Shard};
use self::wakers::Wakers;

/// The inner call of a flight, boxed so that driving it can pass between
/// callers and a task.
pub(crate) type Call<T> = Pin<Box<dyn Future<Output = Result<T, Error>> + Send>>;

/// What a waiter gets: the outcome, and whether its flight had more than one
/// caller.
pub(crate) type Delivery<T> = (Result<T, Error>, bool);

/// Spawns a flight's driving task, or hands it back when there is no tokio
/// runtime to spawn it on.
pub(super) type Spawn<K, T> = fn(Driver<K, T>) -> Result<(), Driver<K, T>>;

/// One inner call, shared by every caller whose key equals `key`.
pub(crate) struct Flight<K, T> {
    key: K,
    hash: u64,
    /// The flight's number in its shard, which names it while it runs.
    seq: u64,
    /// Where its entry is in its shard's map, if it has one.
    index: u32,
    /// The shard whose map holds the flight. Held here rather than reached
    /// through the table, so that callers share no reference count across
    /// keys.
    shard: Arc<Shard<K, T>>,
    /// Set at creation, where the bounds spawning needs are known, so that
    /// leaving needs none of them.
    spawn: Spawn<K, T>,
    /// Run the call to completion once every caller has left.
    detach: bool,
    /// Whether new callers with an equal key join this flight: set from its
    /// start until it publishes, is abandoned or is forgotten. Read and
    /// written only with the shard's lock held.
    registered: AtomicBool,
    /// Whether its leader waits on the flight itself, rather than through
    /// its lone entry in the shard's map. Until it does, that entry stays,
    /// even once the flight is no longer registered. Read and written only
    /// with the shard's lock held.
    leader_moved: AtomicBool,
    state: Mutex<State<T>>,
}

/// Names a flight while it runs: its shard, and its number there.
#[derive(Clone, Copy, PartialEq, Eq)]
struct FlightId {
    shard: usize,
    seq: u64,
}

/// The part of a flight its callers and its task change, guarded by the
/// flight's mutex.
struct State<T> {
    /// Callers whose futures are alive: the leader and the followers.
    /// Raised by `join` (under the shard lock too), lowered by each as it
    /// takes the outcome or leaves.
    waiters: usize,
    /// Followers that ever joined; read at publish to tell the leader whether
    /// its outcome was shared.
    followers: usize,
    /// Wakers of callers that wait for the outcome. Emptied at publish.
    wakers: Wakers,
    /// The inner call, between polls. Taken out by whoever polls it and put
    /// back when it is still pending; `None` while it is polled, and once it
    /// has finished or been dropped.
    call: Option<Call<T>>,
    /// Who polls the call.
    driver: Driving,
    /// The slot of the caller that polled the call last, while the callers
    /// drive it: the one the call will wake.
    poller: Option<usize>,
    /// The published outcome, until the last waiter took it.
    outcome: Option<Result<T, Error>>,
    /// Set once the outcome is published or the flight abandoned.
    done: bool,
}

/// Who polls a flight's call.
enum Driving {
    /// The callers: the one the call wakes polls it. So it is while the call
    /// has one caller, and always where no task can be spawned.
    Callers,
    /// A task of its own, once more than one caller waits for it, with that
    /// task's waker, to tell it when every caller has left.
    Task(Option<Waker>),
    /// No task could be spawned: the callers drive it, for good, unless it
    /// is to run to completion and its last caller leaves in a runtime.
    NoRuntime,
}

/// A caller's place in a flight. Dropping it leaves the flight.
pub(crate) struct Ticket<K, T> {
    place: Place<K, T>,
}

enum Place<K, T> {
    /// The leader of a lone flight, whose entry is at `index` in its
    /// shard's map.
    Lone {
        shard: Arc<Shard<K, T>>,
        hash: u64,
        index: u32,
        seq: u64,
    },
    /// A waiter on a shared flight.
    Waiting(Waiter<K, T>),
    /// A lone leader that took its outcome.
    Done,
}

/// A caller's place in a shared flight. Dropping it leaves the flight.
struct Waiter<K, T> {
    flight: Seat<K, T>,
    /// The caller's slot in the flight's wakers; `None` before a leader's
    /// call is started and once it has left.
    slot: Option<usize>,
}

/// The task that drives a shared call.
pub(crate) struct Driver<K, T> {
    flight: Seat<K, T>,
    /// Set once the task has ended the flight, or found it ended.
    finished: bool,
}

/// A ticket's or a driver's hold on its flight.
struct Seat<K, T> {
    flight: Arc<Flight<K, T>>,
}

// --- impl Ticket ---

impl<K, T: Clone> Ticket<K, T> {
    /// Starts the leader's call, inside the flight's span when tracing. A
    /// panic while making it becomes the flight's outcome, delivered at the
    /// first poll.
    pub(crate) fn start<F>(&mut self, make: impl FnOnce() -> F)
    where
        F: Future<Output = Result<T, Error>> + Send + 'static,
        T: Send + 'static,
    {
        let (shard, hash, index, seq) = match &mut self.place {
            Place::Lone {
                shard,
                hash,
                index,
                seq,
            } => (shard, *hash, *index, *seq),
            Place::Waiting(waiter) => {
                let flight = &waiter.flight;
                let call = make_call(flight.id(), flight.flight.hash, flight.counters(), make);
                return waiter.park(call);
            }
            Place::Done => unreachable!("start after the outcome"),
        };

        // Park the call in the entry until the leader polls it, so that a
        // leader that is never polled holds no one up: a follower that joins
        // takes it from there.
        let call = make_call(FlightId::new(shard, seq), hash, &shard.counters, make);
        let mut map = lock(&shard.map);
        match map.get(index) {
            Entry::Lone(lone) => lone.call = Some(call),
            Entry::Shared(flight) => {
                let flight = Arc::clone(flight);
                let flight = map.take_shared(&flight);
                drop(map);
                let mut waiter = Waiter::new(flight, Some(0));
                waiter.park(call);
                self.place = Place::Waiting(waiter);
            }
            Entry::Moving => unreachable!("an entry is moving outside a lock section"),
        }
    }

    /// Waits for the outcome, polling the call while the callers drive it.
    ///
    /// # Panics
    ///
    /// When polled again after it returned the outcome.
    pub(crate) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Delivery<T>> {
        let (shard, hash, index, seq) = match &mut self.place {
            Place::Lone {
                shard,
                hash,
                index,
                seq,
            } => (shard, *hash, *index, *seq),
            Place::Waiting(waiter) => return waiter.poll(cx),
            Place::Done => panic!("flight polled after it delivered its outcome"),
        };

        // Take the call out of the entry, unless a follower has turned the
        // flight shared: then wait on it like any other caller.
        let mut map = lock(&shard.map);
        let mut call = match map.get(index) {
            Entry::Lone(lone) => lone
                .call
                .take()
                .expect("a lone leader's call is parked between its polls"),
            Entry::Shared(flight) => {
                let flight = Arc::clone(flight);
                let flight = map.take_shared(&flight);
                drop(map);
                let mut waiter = Waiter::new(flight, Some(0));
                let polled = waiter.poll(cx);
                self.place = Place::Waiting(waiter);
                return polled;
            }
            Entry::Moving => unreachable!("an entry is moving outside a lock section"),
        };
        drop(map);

        // Poll it with no lock held.
        let id = FlightId::new(shard, seq);
        let polled = scope(id, || shard.counters.poll_call(&mut call, cx));

        let mut map = lock(&shard.map);
        match map.get(index) {
            // Still alone: park a pending call, or free the key.
            Entry::Lone(lone) => {
                let Poll::Ready(outcome) = polled else {
                    lone.call = Some(call);
                    let replaced = match &lone.waker {
                        Some(waker) if waker.will_wake(cx.waker()) => None,
                        _ => lone.waker.replace(cx.waker().clone()),
                    };
                    // A waker's drop is user code: not under the lock.
                    drop(map);
                    drop(replaced);
                    return Poll::Pending;
                };
                let entry = map.remove(hash, index);
                map.tally.flights -= 1;
                map.tally.waiters -= 1;
                drop(map);
                // Done before the drops, which are user code.
                self.place = Place::Done;
                drop_quietly(call);
                drop(entry);
                Poll::Ready((outcome, false))
            }

            // A follower joined while the call was polled: share it.
            Entry::Shared(flight) => {
                let flight = Arc::clone(flight);
                let flight = map.take_shared(&flight);
                drop(map);
                let mut waiter = Waiter::new(flight, Some(0));
                let polled = match polled {
                    Poll::Pending => waiter.put_back(call, 0, cx),
                    Poll::Ready(outcome) => {
                        waiter.slot = None;
                        Poll::Ready(waiter.flight.deliver(call, outcome, 0))
                    }
                };
                self.place = Place::Waiting(waiter);
                polled
            }
            Entry::Moving => unreachable!("an entry is moving outside a lock section"),
        }
    }
}

impl<K, T> Ticket<K, T> {
    /// A lone flight's leader.
    fn lone(shard: Arc<Shard<K, T>>, hash: u64, index: u32, seq: u64) -> Self {
        Self {
            place: Place::Lone {
                shard,
                hash,
                index,
                seq,
            },
        }
    }

    /// A waiter on a shared flight: a follower, or the leader of a flight
    /// kept out of the map.
    fn waiting(flight: Arc<Flight<K, T>>, slot: Option<usize>) -> Self {
        Self {
            place: Place::Waiting(Waiter::new(flight, slot)),
        }
    }

    fn spawn_driver(&self) {
        if let Place::Waiting(waiter) = &self.place {
            waiter.flight.spawn_driver();
        }
    }
}

impl<K, T> Drop for Ticket<K, T> {
    /// A lone leader that leaves drops its call and frees the key, unless
    /// the call is to run to completion: then the flight turns shared, for a
    /// task to drive it. A waiter leaves through its own drop.
    fn drop(&mut self) {
        let Place::Lone {
            shard, hash, index, ..
        } = &self.place
        else {
            return;
        };
        let (hash, index) = (*hash, *index);
        let mut map = lock(&shard.map);
        let flight = match map.get(index) {
            entry @ Entry::Lone(_) => {
                let Entry::Lone(lone) = &*entry else {
                    unreachable!("matched above");
                };
                match lone.detach {
                    Some(spawn) => {
                        let flight = entry.share(hash, index, shard, spawn);
                        map.tally.move_gauges(&shard.counters);
                        flight
                    }
                    None => {
                        let entry = map.remove(hash, index);
                        map.tally.flights -= 1;
                        map.tally.waiters -= 1;
                        map.tally.abandoned += 1;
                        drop(map);
                        #[cfg(feature = "tracing")]
                        tracing::trace!(key_hash = hash, "every waiter left; dropping the call");
                        return drop_quietly(entry);
                    }
                }
            }
            Entry::Shared(flight) => Arc::clone(flight),
            Entry::Moving => unreachable!("an entry is moving outside a lock section"),
        };
        let flight = map.take_shared(&flight);
        drop(map);
        drop(Waiter::new(flight, Some(0)));
    }
}

/// Makes a leader's call, inside `id`'s scope and the flight's span when
/// tracing. A panic while making it becomes the call's outcome.
fn make_call<T, F>(
    id: FlightId,
    hash: u64,
    counters: &Counters,
    make: impl FnOnce() -> F,
) -> Call<T>
where
    F: Future<Output = Result<T, Error>> + Send + 'static,
    T: Send + 'static,
{
    #[cfg(feature = "tracing")]
    let span = tracing::trace_span!("singleflight.flight", key_hash = hash);
    #[cfg(not(feature = "tracing"))]
    let _ = hash;
    #[cfg(feature = "tracing")]
    let make = || tracing::Instrument::instrument(span.in_scope(make), span.clone());

    match panic::catch_unwind(AssertUnwindSafe(|| scope(id, make))) {
        Ok(call) => Box::pin(call),
        Err(payload) => {
            counters.panics.fetch_add(1, Ordering::Relaxed);
            Box::pin(std::future::ready(Err(Error::panicked(&*payload))))
        }
    }
}

/// Drops a call that no one will poll again, or an entry that held one.
/// Its destructor is user code, and the outcome (if any) is already out: a
/// panic in it reaches no caller.
fn drop_quietly<D>(value: D) {
    if panic::catch_unwind(AssertUnwindSafe(|| drop(value))).is_err() {
        #[cfg(feature = "tracing")]
        tracing::warn!("a call panicked while it was dropped");
    }
}

/// One waiter's copy of a published outcome. `T::clone` is user code: if
/// it panics, this waiter gets the panic as its error, and the flight's
/// state, changed only around this call, stays whole for the others.
fn copy<T: Clone>(outcome: &Result<T, Error>) -> Result<T, Error> {
    match outcome {
        Ok(value) => panic::catch_unwind(AssertUnwindSafe(|| value.clone()))
            .map_err(|payload| Error::panicked(&*payload)),
        Err(error) => Err(error.share()),
    }
}

// --- impl Waiter ---

impl<K, T: Clone> Waiter<K, T> {
    /// Parks a leader's new call until someone polls it. Followers that
    /// joined already get a task to drive it.
    fn park(&mut self, call: Call<T>) {
        let mut state = lock(&self.flight.flight.state);
        if self.slot.is_none() {
            self.slot = Some(state.wakers.insert());
        }
        state.call = Some(call);
        let spawn = state.waiters > 1 && state.hire();
        drop(state);
        if spawn {
            self.flight.spawn_driver();
        }
    }

    /// Waits for the outcome, polling the call while the callers drive it.
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Delivery<T>> {
        let slot = self
            .slot
            .expect("flight polled after it delivered its outcome");
        let mut state = lock(&self.flight.flight.state);

        // Published: take the outcome.
        if state.done {
            let (delivery, freed) = state.take_outcome(slot);
            drop(state);
            drop(freed);
            self.slot = None;
            self.flight
                .counters()
                .waiters
                .fetch_sub(1, Ordering::Relaxed);
            return Poll::Ready(delivery);
        }

        // Driven by the callers and not being polled: poll it, in this
        // caller's task, with no lock held.
        let callers_drive = matches!(state.driver, Driving::Callers | Driving::NoRuntime);
        if let Some(mut call) = callers_drive.then(|| state.call.take()).flatten() {
            state.poller = Some(slot);
            drop(state);
            let id = self.flight.id();
            let polled = scope(id, || self.flight.counters().poll_call(&mut call, cx));
            let Poll::Ready(outcome) = polled else {
                return self.put_back(call, slot, cx);
            };
            self.slot = None;
            return Poll::Ready(self.flight.deliver(call, outcome, slot));
        }

        // Someone else drives it: wait to be woken by the outcome.
        let replaced = state.wakers.register(slot, cx.waker());
        drop(state);
        drop(replaced);
        Poll::Pending
    }

    /// Parks a call that is still pending. When more than one caller waits
    /// for it, a task drives it from now on, and each caller waits to be
    /// woken once, by the outcome.
    fn put_back(&mut self, call: Call<T>, slot: usize, cx: &mut Context<'_>) -> Poll<Delivery<T>> {
        let mut state = lock(&self.flight.flight.state);
        state.call = Some(call);
        let replaced = state.wakers.register(slot, cx.waker());
        let spawn = state.waiters > 1 && state.hire();
        drop(state);
        drop(replaced);
        if spawn {
            self.flight.spawn_driver();
        }
        Poll::Pending
    }
}

impl<K, T> Waiter<K, T> {
    fn new(flight: Arc<Flight<K, T>>, slot: Option<usize>) -> Self {
        Self {
            flight: Seat { flight },
            slot,
        }
    }

    /// Leaves the flight before taking its outcome.
    fn leave(&mut self, slot: usize) {
        let seat = &self.flight;
        let shard = seat.shard();
        shard.counters.waiters.fetch_sub(1, Ordering::Relaxed);
        // Declared before the guards, so dropped after them on every path:
        // a waker's drop is user code.
        let _freed;
        let mut map = lock(&shard.map);
        let mut state = lock(&seat.flight.state);
        state.waiters -= 1;
        _freed = state.wakers.remove(slot);

        // Finished already: free the outcome with the last waiter.
        if state.done {
            let outcome = (state.waiters == 0).then(|| state.outcome.take());
            drop((state, map));
            return drop(outcome);
        }

        // Others still wait. Driven by the callers, the call may wake this
        // one next: wake another to take it up.
        let polled_last = state.poller == Some(slot);
        if polled_last {
            state.poller = None;
        }
        if state.waiters > 0 {
            let next = polled_last.then(|| state.hand_over()).flatten();
            drop((state, map));
            return next.into_iter().for_each(Waker::wake);
        }

        // The last caller left: the call runs on in a task if it is to run to
        // completion; otherwise it is dropped, and its task told to stop. A
        // call being polled right now is dropped by its task, which will find
        // no caller left.
        if seat.flight.detach && state.hire_to_complete() {
            drop((state, map));
            return seat.spawn_driver();
        }
        if seat.flight.detach && matches!(state.driver, Driving::Task(_)) {
            return;
        }
        let call = state.call.take();
        let task = match &mut state.driver {
            Driving::Task(waker) => waker.take(),
            Driving::Callers | Driving::NoRuntime => None,
        };
        if call.is_some() {
            seat.abandon(&mut map, &mut state);
        }
        drop((state, map));
        task.into_iter().for_each(Waker::wake);
        drop_quietly(call);
    }
}

impl<K, T> Drop for Waiter<K, T> {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            self.leave(slot);
        }
    }
}

// --- impl Driver ---

impl<K, T: Clone> Driver<K, T> {
    /// Polls the call until it finishes, or until every caller has left.
    fn drive(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let seat = &self.flight;
        loop {
            let mut state = lock(&seat.flight.state);

            // Ended by someone else, or to end now that no one waits.
            if state.done {
                self.finished = true;
                return Poll::Ready(());
            }
            if state.waiters == 0 && !seat.flight.detach {
                drop(state);
                if seat.abandon_idle() {
                    self.finished = true;
                    return Poll::Ready(());
                }
                continue;
            }

            // Poll the call with no lock held, leaving a waker for the last
            // caller out.
            match &mut state.driver {
                Driving::Task(Some(waker)) if waker.will_wake(cx.waker()) => {}
                driver => *driver = Driving::Task(Some(cx.waker().clone())),
            }
            let Some(mut call) = state.call.take() else {
                return Poll::Pending;
            };
            drop(state);
            let id = seat.id();
            let polled = scope(id, || seat.counters().poll_call(&mut call, cx));
            if let Poll::Ready(outcome) = polled {
                self.finished = true;
                drop(seat.publish(call, outcome, None));
                return Poll::Ready(());
            }

            // Still pending: park it, and stop if every caller left meanwhile.
            let mut state = lock(&seat.flight.state);
            state.call = Some(call);
            if state.waiters > 0 || seat.flight.detach {
                return Poll::Pending;
            }
        }
    }
}

impl<K, T> Drop for Driver<K, T> {
    /// A task dropped before its flight ended (its runtime shut down, or it
    /// could not be spawned) leaves the call to the callers.
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let seat = &self.flight;
        let shard = seat.shard();
        let mut map = lock(&shard.map);
        let mut state = lock(&seat.flight.state);
        state.driver = Driving::NoRuntime;
        if state.done {
            return;
        }
        if state.waiters > 0 {
            let next = state.hand_over();
            drop((state, map));
            return next.into_iter().for_each(Waker::wake);
        }
        let call = state.call.take();
        seat.abandon(&mut map, &mut state);
        drop((state, map));
        drop_quietly(call);
    }
}

// --- impl Flight ---

impl<K, T> Flight<K, T> {
    /// A flight registered in its shard's map and waited on by its leader.
    #[allow(clippy::too_many_arguments)]
    fn new(
        key: K,
        hash: u64,
        seq: u64,
        index: u32,
        shard: &Arc<Shard<K, T>>,
        spawn: Spawn<K, T>,
        detach: bool,
        state: State<T>,
    ) -> Self {
        Self {
            key,
            hash,
            seq,
            index,
            shard: Arc::clone(shard),
            spawn,
            detach,
            registered: AtomicBool::new(true),
            leader_moved: AtomicBool::new(true),
            state: Mutex::new(state),
        }
    }
}

// --- impl Seat ---

impl<K, T> Seat<K, T> {
    fn shard(&self) -> &Shard<K, T> {
        &self.flight.shard
    }

    fn counters(&self) -> &Counters {
        &self.shard().counters
    }

    fn id(&self) -> FlightId {
        FlightId::new(&self.flight.shard, self.flight.seq)
    }

    /// Spawns the flight's driving task; without a runtime, the task is
    /// dropped at once, and its drop leaves the call to the callers.
    fn spawn_driver(&self) {
        #[cfg(feature = "tracing")]
        tracing::trace!(
            key_hash = self.flight.hash,
            "driving a shared call in a task"
        );
        let driver = Driver {
            flight: Seat {
                flight: Arc::clone(&self.flight),
            },
            finished: false,
        };
        drop((self.flight.spawn)(driver));
    }

    /// Publishes the outcome for the caller in `slot`, and hands it its own.
    fn deliver(&self, call: Call<T>, outcome: Result<T, Error>, slot: usize) -> Delivery<T>
    where
        T: Clone,
    {
        let (outcome, shared) = self.publish(call, outcome, Some(slot));
        let outcome = outcome.expect("a publishing caller keeps its outcome");
        (outcome, shared)
    }

    /// Hands out the flight's outcome to every waiter and frees the key,
    /// then drops the call that made it. `slot` is the publishing caller's,
    /// if a caller publishes: it keeps the outcome, and the waiters get a
    /// copy. A task that publishes gives them the outcome itself. Returns
    /// what the publisher kept, and whether the flight had followers.
    fn publish(
        &self,
        call: Call<T>,
        outcome: Result<T, Error>,
        slot: Option<usize>,
    ) -> (Option<Result<T, Error>>, bool)
    where
        T: Clone,
    {
        #[cfg(feature = "tracing")]
        let failed = outcome.is_err();
        let mut outcome = Some(outcome);
        // Free the key first: from here on, a new caller starts a new flight.
        let shard = self.shard();
        lock(&shard.map).unlink(&self.flight);

        // Then store the outcome for the waiters that joined before.
        let (wakers, shared, freed) = {
            let mut state = lock(&self.flight.state);
            let freed = slot.and_then(|slot| {
                state.waiters -= 1;
                state.wakers.remove(slot)
            });
            state.done = true;
            if state.waiters > 0 {
                state.outcome = match slot {
                    Some(_) => outcome.as_ref().map(copy),
                    None => outcome.take(),
                };
            }
            (mem::take(&mut state.wakers), state.followers > 0, freed)
        };
        drop(freed);
        shard.counters.flights.fetch_sub(1, Ordering::Relaxed);
        if slot.is_some() {
            shard.counters.waiters.fetch_sub(1, Ordering::Relaxed);
        }

        #[cfg(feature = "tracing")]
        if failed && shared {
            tracing::debug!(
                key_hash = self.flight.hash,
                "shared call failed; fanning out"
            );
        }

        // Wake outside the lock: a waker may run arbitrary code. The call
        // goes once everyone is woken, even by a waker that panicked.
        let panicked = wakers.wake_all();
        drop_quietly(call);
        if let Some(payload) = panicked {
            panic::resume_unwind(payload);
        }
        (outcome, shared)
    }

    /// Ends a flight no caller waits for, unless one joined meanwhile.
    /// Returns whether the flight is over.
    fn abandon_idle(&self) -> bool {
        let shard = self.shard();
        let mut map = lock(&shard.map);
        let mut state = lock(&self.flight.state);
        if state.waiters > 0 {
            return false;
        }
        let call = state.call.take();
        if !state.done {
            self.abandon(&mut map, &mut state);
        }
        drop((state, map));
        drop_quietly(call);
        true
    }

    /// Marks the flight abandoned and frees its key, with both locks held.
    /// The caller drops the call once it has let go of them: its
    /// destructor is user code.
    fn abandon(&self, map: &mut Flights<K, T>, state: &mut State<T>) {
        state.done = true;
        map.unlink(&self.flight);
        let counters = &self.shard().counters;
        counters.flights.fetch_sub(1, Ordering::Relaxed);
        counters.abandoned.fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "tracing")]
        tracing::trace!(
            key_hash = self.flight.hash,
            "every waiter left; dropping the call"
        );
    }
}

// --- the flights this thread is inside ---

#[cfg(not(singleflight_loom))]
thread_local! {
    /// The flight whose call this thread is making or polling right now.
    static INNERMOST: Cell<Option<FlightId>> = const { Cell::new(None) };
    /// The flights whose calls this thread is inside around the innermost
    /// one, innermost last: empty unless one call makes or polls another.
    static OUTER: RefCell<Vec<FlightId>> = const { RefCell::new(Vec::new()) };
}

// Loom runs its threads on one OS thread: each needs its own copy of these,
// or one model thread would see another inside a flight.
#[cfg(singleflight_loom)]
::loom::thread_local! {
    static INNERMOST: Cell<Option<FlightId>> = Cell::new(None);
    static OUTER: RefCell<Vec<FlightId>> = RefCell::new(Vec::new());
}

impl FlightId {
    fn new<K, T>(shard: &Arc<Shard<K, T>>, seq: u64) -> Self {
        Self {
            shard: Arc::as_ptr(shard).cast::<()>() as usize,
            seq,
        }
    }
}

/// Whether this thread is inside flight `id`'s call: a caller that joined it
/// from there would wait for itself.
fn inside(id: FlightId) -> bool {
    match INNERMOST.with(Cell::get) {
        None => false,
        Some(innermost) => innermost == id || OUTER.with(|outer| outer.borrow().contains(&id)),
    }
}

/// Runs `f`, which makes or polls flight `id`'s call, marked as inside it.
fn scope<R>(id: FlightId, f: impl FnOnce() -> R) -> R {
    struct Leave(Option<FlightId>);
    impl Drop for Leave {
        fn drop(&mut self) {
            if self.0.is_some() {
                OUTER.with(|outer| outer.borrow_mut().pop());
            }
            INNERMOST.with(|innermost| innermost.set(self.0));
        }
    }
    let outer = INNERMOST.with(|innermost| innermost.replace(Some(id)));
    if let Some(outer) = outer {
        OUTER.with(|outers| outers.borrow_mut().push(outer));
    }
    let _leave = Leave(outer);
    f()
}

// --- impl Counters ---

impl Counters {
    /// Polls a call, turning a panic into its error and counting it.
    fn poll_call<T>(&self, call: &mut Call<T>, cx: &mut Context<'_>) -> Poll<Result<T, Error>> {
        match panic::catch_unwind(AssertUnwindSafe(|| call.as_mut().poll(cx))) {
            Ok(polled) => polled,
            Err(payload) => {
                self.panics.fetch_add(1, Ordering::Relaxed);
                Poll::Ready(Err(Error::panicked(&*payload)))
            }
        }
    }
}

// --- impl State ---

impl<T> State<T> {
    fn new() -> Self {
        Self {
            waiters: 1,
            followers: 0,
            wakers: Wakers::default(),
            call: None,
            driver: Driving::Callers,
            poller: None,
            outcome: None,
            done: false,
        }
    }

    /// Hands a parked call to a task, if the callers drive it. Returns
    /// whether to spawn one: outside a tokio runtime, the callers drive the
    /// call for good instead (a task that could not run would only hand it
    /// back, over and over).
    fn hire(&mut self) -> bool {
        if !matches!(self.driver, Driving::Callers) || self.call.is_none() {
            return false;
        }
        if tokio::runtime::Handle::try_current().is_err() {
            self.driver = Driving::NoRuntime;
            return false;
        }
        self.driver = Driving::Task(None);
        self.poller = None;
        true
    }

    /// Like [`hire`](Self::hire), for a call to run to completion once its
    /// last caller has left: callers that once found no runtime do not
    /// stop a task from being hired now, from a runtime.
    fn hire_to_complete(&mut self) -> bool {
        if matches!(self.driver, Driving::NoRuntime) {
            self.driver = Driving::Callers;
        }
        self.hire()
    }

    /// Picks a waiting caller to poll the parked call next, and returns its
    /// waker. It counts as the last poller until it polls, so that if it
    /// leaves first, it hands the call over in turn.
    fn hand_over(&mut self) -> Option<Waker> {
        let (slot, waker) = self.wakers.take_one()?;
        self.poller = Some(slot);
        Some(waker)
    }

    /// Takes this waiter's copy of the published outcome: the last one out
    /// takes the stored value itself.
    /// Returns the waiter's freed waker too, for the caller to drop once
    /// it has let go of the lock.
    fn take_outcome(&mut self, slot: usize) -> (Delivery<T>, Option<Waker>)
    where
        T: Clone,
    {
        let freed = self.wakers.remove(slot);
        self.waiters -= 1;
        let outcome = if self.waiters == 0 {
            self.outcome.take()
        } else {
            self.outcome.as_ref().map(copy)
        };
        let outcome = outcome.expect("a finished flight with waiters keeps its outcome");
        ((outcome, true), freed)
    }
}

/// Spawns a driving task on the current tokio runtime; outside one, hands
/// the driver back.
fn spawn_driver<K, T>(driver: Driver<K, T>) -> Result<(), Driver<K, T>>
where
    K: Hash + Eq + Send + Sync + 'static,
    T: Clone + Send + 'static,
{
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => {
            runtime.spawn(driver);
            Ok(())
        }
        Err(_) => Err(driver),
    }
}

impl<K, T: Clone> Future for Driver<K, T> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.drive(cx)
    }
}
