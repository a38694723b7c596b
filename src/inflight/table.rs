//! The map from keys to flights, split into shards.

use std::collections::hash_map::{Entry, HashMap, RandomState};
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher};

use super::{spawn_driver, Flight, State, Ticket};
use crate::sync::{lock, Arc, AtomicBool, AtomicU64, Mutex, Ordering};
use crate::Stats;

/// Flights in progress, sharded by the key's hash.
pub(crate) struct Table<K, T> {
    /// Randomly keyed, so that untrusted keys cannot flood one bucket.
    hasher: RandomState,
    shards: Box<[Arc<Shard<K, T>>]>,
}

pub(super) type FlightMap<K, T> = HashMap<u64, Bucket<K, T>, BuildHasherDefault<HashIsKey>>;

/// One lock's worth of the table, padded so shards do not share cache lines.
#[repr(align(128))]
pub(super) struct Shard<K, T> {
    /// Flights by key hash.
    ///
    /// Invariant: a flight is in here exactly while its `registered` flag is
    /// set, which holds from its leader's arrival until it publishes, is
    /// abandoned, or is forgotten. This mutex guards the map and every
    /// flight's `registered` flag.
    pub(super) map: Mutex<FlightMap<K, T>>,
    pub(super) counters: Counters,
}

/// The flights whose keys share one hash. Almost always one; equal hashes
/// alone never make two keys share a flight.
pub(super) enum Bucket<K, T> {
    One(Arc<Flight<K, T>>),
    Many(Vec<Arc<Flight<K, T>>>),
}

/// Counters of one shard. Gauges rise and fall on the shard of their flight,
/// so each shard's gauge stays non-negative on its own.
#[derive(Default)]
pub(super) struct Counters {
    pub(super) flights: AtomicU64,
    pub(super) waiters: AtomicU64,
    pub(super) leaders: AtomicU64,
    pub(super) followers: AtomicU64,
    pub(super) panics: AtomicU64,
    pub(super) abandoned: AtomicU64,
}

// --- impl Table ---

impl<K: Hash + Eq, T: Clone> Table<K, T> {
    /// Creates an empty table with a shard count suited to this machine.
    pub(crate) fn new() -> Self {
        // Four shards a core keeps two busy keys apart most of the time; the
        // loom models need only two to see keys on different locks.
        let cores = std::thread::available_parallelism().map_or(4, usize::from);
        let count = if cfg!(singleflight_loom) {
            2
        } else {
            (cores * 4).next_power_of_two()
        };
        let shards = (0..count)
            .map(|_| {
                Arc::new(Shard {
                    map: Mutex::new(FlightMap::default()),
                    counters: Counters::default(),
                })
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
    pub(crate) fn join(&self, key: K, detach: bool) -> (Ticket<K, T>, bool)
    where
        K: Send + Sync + 'static,
        T: Send + 'static,
    {
        let hash = self.hasher.hash_one(&key);
        let shard = self.shard(hash);
        let mut map = lock(&shard.map);

        // A flight in progress: become one of its waiters, unless this call
        // comes from inside that flight's own call, which would then wait
        // for itself.
        let found = map.get(&hash).and_then(|bucket| bucket.find(&key));
        let own = found.is_some_and(|flight| super::driving(flight));
        if let Some(flight) = found.filter(|_| !own) {
            let flight = Arc::clone(flight);
            let (slot, spawn) = {
                let mut state = lock(&flight.state);
                debug_assert!(!state.done, "a registered flight has finished");
                state.waiters += 1;
                state.followers += 1;
                (state.wakers.insert(), state.hire())
            };
            drop(map);
            #[cfg(feature = "tracing")]
            tracing::trace!(key_hash = hash, "joined a flight in progress as a follower");
            shard.counters.followers.fetch_add(1, Ordering::Relaxed);
            shard.counters.waiters.fetch_add(1, Ordering::Relaxed);
            let ticket = Ticket::new(flight, Some(slot));

            // The call was parked between a lone caller's polls: now that it
            // is shared, a task of its own drives it.
            if spawn {
                ticket.flight.spawn_driver();
            }
            return (ticket, false);
        }

        // None: this caller leads a new flight. A call from inside its own
        // key's flight leads one of its own, left out of the map.
        let flight = Arc::new(Flight {
            key,
            hash,
            shard: Arc::clone(shard),
            spawn: spawn_driver::<K, T>,
            detach,
            registered: AtomicBool::new(!own),
            state: Mutex::new(State::new()),
        });
        match map.entry(hash) {
            _ if own => {}
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
        (Ticket::new(flight, None), true)
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
        let keys =
            |shard: &Arc<Shard<K, T>>| lock(&shard.map).values().map(Bucket::len).sum::<usize>();
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
    pub(super) fn shard(&self, hash: u64) -> &Arc<Shard<K, T>> {
        // The map inside uses the low bits and hashbrown's tag the top ones,
        // so pick the shard from the middle.
        let index = (hash >> 32) as usize & (self.shards.len() - 1);
        &self.shards[index]
    }

    /// Takes `flight` out of the map if it is still there. Needs the shard
    /// lock, which the caller passes in.
    pub(super) fn unlink(map: &mut FlightMap<K, T>, flight: &Arc<Flight<K, T>>) {
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

/// A hasher for keys that are already hashes.
#[derive(Default)]
pub(super) struct HashIsKey(u64);

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
