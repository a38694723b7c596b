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
//! the inner call is polled or dropped, or while a waker runs.

use std::collections::hash_map::{Entry, HashMap, RandomState};
use std::future::Future;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher};
use std::mem;
use std::panic::{self, AssertUnwindSafe};
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use crate::error::Error;
use crate::sync::{lock, Arc, AtomicBool, AtomicU64, Mutex, Ordering};
use crate::Stats;

/// The inner call of a flight, boxed so that driving it can pass between
/// waiters.
pub(crate) type Call<T> = Pin<Box<dyn Future<Output = Result<T, Error>> + Send>>;

/// What a waiter gets: the outcome, and whether it went to more than one.
pub(crate) type Delivery<T> = (Result<T, Error>, bool);

/// Flights in progress, sharded by the key's hash.
pub(crate) struct Table<K, T> {
    /// Randomly keyed, so that untrusted keys cannot flood one bucket.
    hasher: RandomState,
    shards: Box<[Shard<K, T>]>,
}

type FlightMap<K, T> = HashMap<u64, Bucket<K, T>, BuildHasherDefault<HashIsKey>>;

/// One lock's worth of the table, padded so shards do not share cache lines.
#[repr(align(128))]
struct Shard<K, T> {
    /// Flights by key hash.
    ///
    /// Invariant: a flight is in here exactly while its `registered` flag is
    /// set, which holds from its leader's arrival until it publishes, is
    /// abandoned, or is forgotten. This mutex guards the map and every
    /// flight's `registered` flag.
    map: Mutex<FlightMap<K, T>>,
    counters: Counters,
}

/// The flights whose keys share one hash. Almost always one; equal hashes
/// alone never make two keys share a flight.
enum Bucket<K, T> {
    One(Arc<Flight<K, T>>),
    Many(Vec<Arc<Flight<K, T>>>),
}

/// Counters of one shard. Gauges rise and fall on the shard of their flight,
/// so each shard's gauge stays non-negative on its own.
#[derive(Default)]
struct Counters {
    flights: AtomicU64,
    waiters: AtomicU64,
    leaders: AtomicU64,
    followers: AtomicU64,
    panics: AtomicU64,
    abandoned: AtomicU64,
}

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

// --- impl Table ---

impl<K: Hash + Eq, T: Clone> Table<K, T> {
    /// Creates an empty table with a shard count suited to this machine.
    pub(crate) fn new() -> Self {
        let cores = std::thread::available_parallelism().map_or(4, usize::from);
        let count = (cores * 4).next_power_of_two();
        let shards = (0..count)
            .map(|_| Shard {
                map: Mutex::default(),
                counters: Counters::default(),
            })
            .collect();
        Self {
            hasher: RandomState::new(),
            shards,
        }
    }

    /// Joins the flight for `key`, starting one if none is in progress.
    ///
    /// Returns the caller's ticket and whether it leads the new flight.
    pub(crate) fn join(self: &Arc<Self>, key: K, detach: bool) -> (Ticket<K, T>, bool)
    where
        K: Send + Sync + 'static,
        T: Send + 'static,
    {
        let hash = self.hasher.hash_one(&key);
        let shard = self.shard(hash);
        let mut map = lock(&shard.map);

        // A flight in progress: become one of its waiters.
        if let Some(flight) = map.get(&hash).and_then(|bucket| bucket.find(&key)) {
            let flight = Arc::clone(flight);
            let slot = {
                let mut state = lock(&flight.state);
                debug_assert!(!state.done, "a registered flight has finished");
                state.waiters += 1;
                state.followers += 1;
                state.wakers.insert()
            };
            drop(map);
            #[cfg(feature = "tracing")]
            tracing::trace!(key_hash = hash, "joined a flight in progress as a follower");
            shard.counters.followers.fetch_add(1, Ordering::Relaxed);
            shard.counters.waiters.fetch_add(1, Ordering::Relaxed);
            let ticket = Ticket::new(Arc::clone(self), flight, Seat::Waiting(slot));
            return (ticket, false);
        }

        // None: this caller leads a new flight.
        let flight = Arc::new(Flight {
            key,
            hash,
            detach: detach.then_some(spawn_detached::<K, T> as fn(Ticket<K, T>)),
            registered: AtomicBool::new(true),
            state: Mutex::new(State::new()),
        });
        match map.entry(hash) {
            Entry::Vacant(vacant) => {
                vacant.insert(Bucket::One(Arc::clone(&flight)));
            }
            Entry::Occupied(mut occupied) => occupied.get_mut().push(Arc::clone(&flight)),
        }
        drop(map);
        #[cfg(feature = "tracing")]
        tracing::trace!(key_hash = hash, "started a flight as its leader");

        let counters = &shard.counters;
        counters.leaders.fetch_add(1, Ordering::Relaxed);
        counters.flights.fetch_add(1, Ordering::Relaxed);
        counters.waiters.fetch_add(1, Ordering::Relaxed);
        (
            Ticket::new(Arc::clone(self), flight, Seat::Driving(None)),
            true,
        )
    }

    /// Unlinks the flight for `key`, so the next caller starts a new one.
    ///
    /// The flight itself runs on for the waiters it has.
    pub(crate) fn forget(&self, key: &K) -> bool {
        let hash = self.hasher.hash_one(key);
        let mut map = lock(&self.shard(hash).map);
        let Entry::Occupied(mut occupied) = map.entry(hash) else {
            return false;
        };
        let Some(flight) = occupied.get().find(key).map(Arc::clone) else {
            return false;
        };
        if occupied.get_mut().remove(&flight) {
            occupied.remove();
        }
        flight.registered.store(false, Ordering::Relaxed);
        true
    }

    /// The number of keys with a flight in progress.
    pub(crate) fn len(&self) -> usize {
        let keys = |shard: &Shard<K, T>| lock(&shard.map).values().map(Bucket::len).sum::<usize>();
        self.shards.iter().map(keys).sum()
    }

    /// Adds up every shard's counters.
    pub(crate) fn stats(&self) -> Stats {
        let mut stats = Stats::default();
        for shard in self.shards.iter() {
            let c = &shard.counters;
            stats.flights += c.flights.load(Ordering::Relaxed);
            stats.waiters += c.waiters.load(Ordering::Relaxed);
            stats.leaders += c.leaders.load(Ordering::Relaxed);
            stats.followers += c.followers.load(Ordering::Relaxed);
            stats.panics += c.panics.load(Ordering::Relaxed);
            stats.abandoned += c.abandoned.load(Ordering::Relaxed);
        }
        stats
    }
}

impl<K, T> Table<K, T> {
    fn shard(&self, hash: u64) -> &Shard<K, T> {
        // The map inside uses the low bits and hashbrown's tag the top ones,
        // so pick the shard from the middle.
        let index = (hash >> 32) as usize & (self.shards.len() - 1);
        &self.shards[index]
    }

    /// Takes `flight` out of the map if it is still there. Needs the shard
    /// lock, which the caller passes in.
    fn unlink(map: &mut FlightMap<K, T>, flight: &Arc<Flight<K, T>>) {
        if !flight.registered.swap(false, Ordering::Relaxed) {
            return;
        }
        if let Entry::Occupied(mut occupied) = map.entry(flight.hash) {
            if occupied.get_mut().remove(flight) {
                occupied.remove();
            }
        }
    }
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

// --- impl Bucket ---

impl<K: Eq, T> Bucket<K, T> {
    fn find(&self, key: &K) -> Option<&Arc<Flight<K, T>>> {
        match self {
            Self::One(flight) => (flight.key == *key).then_some(flight),
            Self::Many(flights) => flights.iter().find(|flight| flight.key == *key),
        }
    }

    fn push(&mut self, flight: Arc<Flight<K, T>>) {
        match self {
            Self::One(first) => {
                let first = Arc::clone(first);
                *self = Self::Many(vec![first, flight]);
            }
            Self::Many(flights) => flights.push(flight),
        }
    }

    fn len(&self) -> usize {
        match self {
            Self::One(_) => 1,
            Self::Many(flights) => flights.len(),
        }
    }
}

impl<K, T> Bucket<K, T> {
    /// Removes `flight`; returns whether the bucket is now empty.
    fn remove(&mut self, flight: &Arc<Flight<K, T>>) -> bool {
        match self {
            Self::One(only) => Arc::ptr_eq(only, flight),
            Self::Many(flights) => {
                flights.retain(|other| !Arc::ptr_eq(other, flight));
                flights.is_empty()
            }
        }
    }
}

// --- impl Wakers ---

/// A slab of waiter wakers: a slot per waiting ticket, reused once freed.
#[derive(Default)]
struct Wakers {
    slots: Vec<Slot>,
    /// Head of the list of free slots.
    free: Option<usize>,
}

enum Slot {
    Free(Option<usize>),
    Used(Option<Waker>),
}

impl Wakers {
    fn insert(&mut self) -> usize {
        match self.free {
            Some(index) => {
                let Slot::Free(next) = self.slots[index] else {
                    unreachable!("free list points at a used slot");
                };
                self.free = next;
                self.slots[index] = Slot::Used(None);
                index
            }
            None => {
                self.slots.push(Slot::Used(None));
                self.slots.len() - 1
            }
        }
    }

    /// Stores `waker` in `slot`, unless the one there wakes the same task.
    fn register(&mut self, slot: usize, waker: &Waker) {
        if let Some(Slot::Used(stored)) = self.slots.get_mut(slot) {
            match stored {
                Some(old) if old.will_wake(waker) => {}
                _ => *stored = Some(waker.clone()),
            }
        }
    }

    fn remove(&mut self, slot: usize) {
        // After publish the slab is empty; nothing is left to free.
        if slot < self.slots.len() {
            self.slots[slot] = Slot::Free(self.free);
            self.free = Some(slot);
        }
    }

    /// Takes the waker of one waiting ticket, to hand a parked call over.
    fn take_one(&mut self) -> Option<Waker> {
        self.slots.iter_mut().find_map(|slot| match slot {
            Slot::Used(waker) => waker.take(),
            Slot::Free(_) => None,
        })
    }

    fn wake_all(self) {
        for slot in self.slots {
            if let Slot::Used(Some(waker)) = slot {
                waker.wake();
            }
        }
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

/// A hasher for keys that are already hashes.
#[derive(Default)]
struct HashIsKey(u64);

impl Hasher for HashIsKey {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(byte);
        }
    }

    fn write_u64(&mut self, hash: u64) {
        self.0 = hash;
    }
}
