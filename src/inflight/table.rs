//! The map from keys to flights, split into shards.

use std::collections::hash_map::{Entry as MapEntry, HashMap, RandomState};
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher};
use std::mem;
use std::task::Waker;

use super::{inside, spawn_driver, Call, Flight, FlightId, Spawn, State, Ticket};
use crate::sync::{lock, Arc, AtomicU64, Mutex, Ordering};
use crate::Stats;

/// Flights in progress, sharded by the key's hash.
pub(crate) struct Table<K, T> {
    /// Randomly keyed, so that untrusted keys cannot flood one bucket.
    hasher: RandomState,
    shards: Box<[Arc<Shard<K, T>>]>,
}

/// One lock's worth of the table, padded so shards do not share cache lines.
#[repr(align(128))]
pub(super) struct Shard<K, T> {
    /// The flights of this shard, and everything a lone flight needs.
    pub(super) map: Mutex<Flights<K, T>>,
    /// Counters of shared flights, changed where the shard lock is not held.
    pub(super) counters: Counters,
}

/// What a shard's lock guards.
pub(super) struct Flights<K, T> {
    /// Where the entries of each key hash start in `slab`.
    ///
    /// Invariant: a key's flight is found here (is *visible*) from its
    /// leader's arrival until it publishes, is abandoned, or is forgotten.
    /// A shared flight whose lone leader has not yet learned it was shared
    /// stays here, invisible, until that leader comes for it.
    heads: HashMap<u64, u32, BuildHasherDefault<HashIsKey>>,
    /// The entries, each in the chain of its key hash. A lone leader finds
    /// its entry here by index, with no lookup: the entry stays at its
    /// index until its flight ends.
    slab: Vec<Slot<K, T>>,
    /// The first free slot of `slab`.
    free: Option<u32>,
    /// How many slots of `slab` hold an entry.
    used: usize,
    /// How many slots at the end of `slab` are known to be free.
    free_tail: usize,
    /// Counters changed with the lock held: all of a lone flight's, and a
    /// follower's arrival.
    pub(super) tally: Tally,
    /// The sequence number of the next flight of this shard.
    next: u64,
}

/// A place in a shard's slab.
enum Slot<K, T> {
    /// An entry, and the next entry with the same key hash.
    Used(Entry<K, T>, Option<u32>),
    /// A free place, and the next free one.
    Free(Option<u32>),
}

/// What joining found.
enum Joined<K> {
    /// A visible flight for the key, at this index, and the caller's key,
    /// handed back to be dropped once the lock is released.
    Follow(u32, K),
    /// A new lone flight, at this index.
    Lead(u32),
    /// A visible flight for the key whose call this thread is inside: the
    /// caller leads a flight of its own, out of the map.
    Own(K),
}

/// A flight in a shard's map.
pub(super) enum Entry<K, T> {
    /// A flight only its leader has waited for: kept in the map whole, so
    /// that it allocates nothing but its call.
    Lone(Lone<K, T>),
    /// A flight that more than one caller has waited for, or that had to
    /// outlive its leader.
    Shared(Arc<Flight<K, T>>),
    /// Never seen outside a lock section: a lone flight turning shared.
    Moving,
}

/// A flight with its leader as its only caller.
pub(super) struct Lone<K, T> {
    pub(super) key: K,
    pub(super) seq: u64,
    /// The call, between the leader's polls.
    pub(super) call: Option<Call<T>>,
    /// The leader's waker, from its last poll that left the call pending: a
    /// follower that joins hands it to the flight, so the leader is woken by
    /// the outcome once a task drives the call.
    pub(super) waker: Option<Waker>,
    /// How to drive the call once every caller has left, when it is to run
    /// to completion.
    pub(super) detach: Option<Spawn<K, T>>,
    /// Set by `forget`: the flight runs on for its leader, but no one joins it.
    pub(super) forgotten: bool,
}

/// Counters kept under a shard's lock. Gauges rise and fall in the set of
/// their flight (a lone flight that turns shared moves its share), so each
/// set's gauges stay non-negative on their own.
#[derive(Default)]
pub(super) struct Tally {
    pub(super) flights: u64,
    pub(super) waiters: u64,
    pub(super) leaders: u64,
    pub(super) followers: u64,
    pub(super) abandoned: u64,
}

/// Counters of one shard changed without its lock held.
#[derive(Default)]
pub(super) struct Counters {
    pub(super) flights: AtomicU64,
    pub(super) waiters: AtomicU64,
    pub(super) panics: AtomicU64,
    pub(super) abandoned: AtomicU64,
}

// --- impl Tally ---

impl Tally {
    /// Moves a lone flight's share of the gauges to the shared counters, as
    /// it turns shared.
    pub(super) fn move_gauges(&mut self, counters: &Counters) {
        self.flights -= 1;
        self.waiters -= 1;
        counters.flights.fetch_add(1, Ordering::Relaxed);
        counters.waiters.fetch_add(1, Ordering::Relaxed);
    }
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
                    map: Mutex::new(Flights {
                        heads: HashMap::default(),
                        slab: Vec::new(),
                        free: None,
                        used: 0,
                        free_tail: 0,
                        tally: Tally::default(),
                        next: 0,
                    }),
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
        let mut guard = lock(&shard.map);
        let map = &mut *guard;

        // A flight in progress: become one of its waiters, unless this call
        // comes from inside that flight's own call, which would then wait
        // for itself. Otherwise lead a new, lone flight.
        let own = |seq| inside(FlightId::new(shard, seq));
        let lone = |key, seq| {
            Entry::Lone(Lone {
                key,
                seq,
                call: None,
                waker: None,
                detach: detach.then_some(spawn_driver::<K, T> as Spawn<K, T>),
                forgotten: false,
            })
        };
        let (index, key) = match map.join(hash, key, own, lone) {
            Joined::Follow(index, key) => (index, key),
            Joined::Lead(index) => {
                let seq = map.next - 1;
                map.tally.leaders += 1;
                map.tally.flights += 1;
                map.tally.waiters += 1;
                drop(guard);
                #[cfg(feature = "tracing")]
                tracing::trace!(key_hash = hash, "started a flight as its leader");
                return (Ticket::lone(Arc::clone(shard), hash, index, seq), true);
            }
            Joined::Own(key) => {
                let seq = map.next;
                map.next += 1;
                map.tally.leaders += 1;
                drop(guard);
                shard.counters.flights.fetch_add(1, Ordering::Relaxed);
                shard.counters.waiters.fetch_add(1, Ordering::Relaxed);
                let spawn = spawn_driver::<K, T>;
                let (index, state) = (u32::MAX, State::new());
                let flight = Flight::new(key, hash, seq, index, shard, spawn, detach, state);
                flight.registered.store(false, Ordering::Relaxed);
                return (Ticket::waiting(Arc::new(flight), None), true);
            }
        };

        // A lone flight turns shared: its call and its leader's waker move
        // to a flight of their own, which its leader finds in its entry.
        let entry = map.get(index);
        if let Entry::Lone(_) = entry {
            entry.share(hash, index, shard, spawn_driver::<K, T>);
            map.tally.move_gauges(&shard.counters);
        }
        let Entry::Shared(flight) = map.get(index) else {
            unreachable!("a lone flight was just shared");
        };
        let flight = Arc::clone(flight);
        let (slot, spawn) = {
            let mut state = lock(&flight.state);
            debug_assert!(!state.done, "a registered flight has finished");
            state.waiters += 1;
            state.followers += 1;
            (state.wakers.insert(), state.hire())
        };
        map.tally.followers += 1;
        drop(guard);
        shard.counters.waiters.fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "tracing")]
        tracing::trace!(key_hash = hash, "joined a flight in progress as a follower");
        let ticket = Ticket::waiting(flight, Some(slot));

        // The call was parked between a lone caller's polls: now that it is
        // shared, a task of its own drives it.
        if spawn {
            ticket.spawn_driver();
        }

        // The caller's own key goes last, with no lock held: its drop is
        // user code, and if it panics, the ticket's drop leaves the flight.
        drop(key);
        (ticket, false)
    }

    /// Unlinks the flight for `key`, so the next caller starts a new one.
    ///
    /// The flight itself runs on for the waiters it has.
    pub(crate) fn forget(&self, key: &K) -> bool {
        let hash = self.hasher.hash_one(key);
        let mut map = lock(&self.shard(hash).map);
        let Some(index) = map.find(hash, key) else {
            return false;
        };
        match map.get(index) {
            Entry::Lone(lone) => lone.forgotten = true,
            Entry::Shared(flight) => {
                let flight = Arc::clone(flight);
                map.unlink(&flight);
            }
            Entry::Moving => unreachable!("an entry is moving outside a lock section"),
        }
        true
    }

    /// The number of keys with a flight that new callers would join.
    pub(crate) fn len(&self) -> usize {
        let keys = |shard: &Arc<Shard<K, T>>| {
            let map = lock(&shard.map);
            map.entries().filter(|entry| entry.is_visible()).count()
        };
        self.shards.iter().map(keys).sum()
    }

    /// The number of entries in the map, visible or not: zero once every
    /// caller has gone.
    #[cfg(all(test, singleflight_loom))]
    pub(crate) fn entries(&self) -> usize {
        let entries = |shard: &Arc<Shard<K, T>>| lock(&shard.map).entries().count();
        self.shards.iter().map(entries).sum()
    }

    /// Adds up every shard's counters.
    pub(crate) fn stats(&self) -> Stats {
        let mut stats = Stats::default();
        for shard in self.shards.iter() {
            let map = lock(&shard.map);
            let tally = &map.tally;
            let c = &shard.counters;
            stats.flights += tally.flights + c.flights.load(Ordering::Relaxed);
            stats.waiters += tally.waiters + c.waiters.load(Ordering::Relaxed);
            stats.leaders += tally.leaders;
            stats.followers += tally.followers;
            stats.panics += c.panics.load(Ordering::Relaxed);
            stats.abandoned += tally.abandoned + c.abandoned.load(Ordering::Relaxed);
        }
        stats
    }
}

impl<K, T> Table<K, T> {
    fn shard(&self, hash: u64) -> &Arc<Shard<K, T>> {
        // The map inside uses the low bits and hashbrown's tag the top ones,
        // so pick the shard from the middle.
        let index = (hash >> 32) as usize & (self.shards.len() - 1);
        &self.shards[index]
    }
}

// --- impl Flights ---

impl<K: Eq, T> Flights<K, T> {
    /// Finds the visible flight for `key`, or starts a lone one made by
    /// `lone` from the key and a new sequence number.
    fn join(
        &mut self,
        hash: u64,
        key: K,
        own: impl Fn(u64) -> bool,
        lone: impl FnOnce(K, u64) -> Entry<K, T>,
    ) -> Joined<K> {
        let (index, chain) = match self.heads.entry(hash) {
            MapEntry::Occupied(mut head) => {
                if let Some(index) = find(&self.slab, *head.get(), &key) {
                    let Slot::Used(entry, _) = &self.slab[index as usize] else {
                        unreachable!("found a used slot");
                    };
                    return if own(entry.seq()) {
                        Joined::Own(key)
                    } else {
                        Joined::Follow(index, key)
                    };
                }
                let index = place(&mut self.slab, &mut self.free, &mut self.free_tail);
                let chain = Some(*head.get());
                *head.get_mut() = index;
                (index, chain)
            }
            MapEntry::Vacant(vacant) => {
                let index = place(&mut self.slab, &mut self.free, &mut self.free_tail);
                vacant.insert(index);
                (index, None)
            }
        };
        let seq = self.next;
        self.next += 1;
        self.used += 1;
        self.slab[index as usize] = Slot::Used(lone(key, seq), chain);
        Joined::Lead(index)
    }

    /// The index of the visible flight for `key`.
    fn find(&self, hash: u64, key: &K) -> Option<u32> {
        find(&self.slab, *self.heads.get(&hash)?, key)
    }
}

/// Walks the chain from `index` to the visible entry for `key`.
fn find<K: Eq, T>(slab: &[Slot<K, T>], index: u32, key: &K) -> Option<u32> {
    let mut at = Some(index);
    while let Some(index) = at {
        let Slot::Used(entry, next) = &slab[index as usize] else {
            unreachable!("a chain holds used slots");
        };
        let matches = match entry {
            Entry::Lone(lone) => !lone.forgotten && lone.key == *key,
            Entry::Shared(flight) => {
                flight.registered.load(Ordering::Relaxed) && flight.key == *key
            }
            Entry::Moving => false,
        };
        if matches {
            return Some(index);
        }
        at = *next;
    }
    None
}

/// The slab slots a shard keeps however few flights it holds.
const KEEP_SLOTS: usize = 64;

/// Takes a free slot, or a new one, and returns its index. The caller
/// fills it.
fn place<K, T>(slab: &mut Vec<Slot<K, T>>, free: &mut Option<u32>, free_tail: &mut usize) -> u32 {
    if let Some(index) = *free {
        let Slot::Free(next) = slab[index as usize] else {
            unreachable!("the free list holds free slots");
        };
        *free = next;
        // A slot taken from the free run at the end shortens it to the
        // slots after this one.
        if *free_tail > 0 {
            *free_tail = (*free_tail).min(slab.len() - 1 - index as usize);
        }
        return index;
    }
    *free_tail = 0;
    slab.push(Slot::Free(None));
    u32::try_from(slab.len() - 1).expect("fewer than 2^32 flights in progress in one shard")
}

impl<K, T> Flights<K, T> {
    /// The entry at `index`.
    ///
    /// # Panics
    ///
    /// When no flight is there: a caller holds an index only while its
    /// flight's entry is in the map.
    pub(super) fn get(&mut self, index: u32) -> &mut Entry<K, T> {
        match &mut self.slab[index as usize] {
            Slot::Used(entry, _) => entry,
            Slot::Free(_) => unreachable!("a flight's entry outlives its holders"),
        }
    }

    /// Takes the entry at `index`, of key hash `hash`, out of the map.
    pub(super) fn remove(&mut self, hash: u64, index: u32) -> Entry<K, T> {
        let slot = mem::replace(&mut self.slab[index as usize], Slot::Free(self.free));
        self.free = Some(index);
        let Slot::Used(entry, next) = slot else {
            unreachable!("a flight's entry outlives its holders");
        };
        self.used -= 1;

        // Unchain it: almost always the only entry of its hash.
        let MapEntry::Occupied(mut head) = self.heads.entry(hash) else {
            unreachable!("a used slot is chained");
        };
        if *head.get() == index {
            match next {
                Some(next) => *head.get_mut() = next,
                None => drop(head.remove()),
            }
        } else {
            let mut at = *head.get();
            loop {
                let Slot::Used(_, after) = &mut self.slab[at as usize] else {
                    unreachable!("a chain holds used slots");
                };
                match *after {
                    Some(after_index) if after_index == index => {
                        *after = next;
                        break;
                    }
                    Some(after_index) => at = after_index,
                    None => unreachable!("a used slot is chained"),
                }
            }
        }
        self.shrink(index);
        entry
    }

    /// Gives back the memory of a burst of flights as it ends, so that the
    /// map's size follows the flights in progress: all of it once the shard
    /// holds none; before that, once the free slots at the end of the slab
    /// are half of it, those slots and the heads' spare room. An entry
    /// keeps its index for life, so one that outlives a burst at its end
    /// keeps the slab up to it until it ends.
    #[inline]
    fn shrink(&mut self, freed: u32) {
        // A slab this small is kept: the common case, and a cheap one.
        if self.slab.capacity() > KEEP_SLOTS {
            self.shrink_large(freed);
        }
    }

    /// [`shrink`](Self::shrink), for a slab larger than the few slots every
    /// shard may keep. The free run at the end is tracked only here, so it
    /// may be longer than `free_tail` says: the walk back finds the rest.
    #[cold]
    fn shrink_large(&mut self, freed: u32) {
        // Grow the known free run at the end, if `freed` borders it.
        let len = self.slab.len();
        if freed as usize + 1 + self.free_tail == len {
            self.free_tail += 1;
            while self.free_tail < len
                && matches!(self.slab[len - 1 - self.free_tail], Slot::Free(_))
            {
                self.free_tail += 1;
            }
        }
        if self.used == 0 {
            self.slab = Vec::new();
            self.free = None;
            self.heads = HashMap::default();
            self.free_tail = 0;
            return;
        }
        if self.free_tail * 2 < len {
            return;
        }

        // Cut the free run, and rebuild the free list over what is left: a
        // walk of the slab, paid for by the half of it that goes.
        self.slab.truncate(len - self.free_tail);
        self.free_tail = 0;
        self.free = None;
        for (index, slot) in self.slab.iter_mut().enumerate().rev() {
            if let Slot::Free(next) = slot {
                *next = self.free;
                self.free = Some(u32::try_from(index).expect("slab indices fit in u32"));
            }
        }
        self.slab.shrink_to(self.slab.len().max(KEEP_SLOTS));
        self.heads.shrink_to(self.heads.len());
    }

    /// Every entry, visible or not.
    fn entries(&self) -> impl Iterator<Item = &Entry<K, T>> {
        self.slab.iter().filter_map(|slot| match slot {
            Slot::Used(entry, _) => Some(entry),
            Slot::Free(_) => None,
        })
    }

    /// Makes a shared flight invisible, so the next caller starts a new one.
    /// Its entry goes too, unless its leader has yet to come for it.
    pub(super) fn unlink(&mut self, flight: &Flight<K, T>) {
        if !flight.registered.swap(false, Ordering::Relaxed) {
            return;
        }
        if flight.leader_moved.load(Ordering::Relaxed) {
            drop(self.remove(flight.hash, flight.index));
        }
    }

    /// A lone leader takes up its flight, which turned shared: from now on
    /// it waits on it like any other caller. Drops an invisible entry.
    pub(super) fn take_shared(&mut self, flight: &Arc<Flight<K, T>>) -> Arc<Flight<K, T>> {
        flight.leader_moved.store(true, Ordering::Relaxed);
        if !flight.registered.load(Ordering::Relaxed) {
            drop(self.remove(flight.hash, flight.index));
        }
        Arc::clone(flight)
    }
}

// --- impl Entry ---

impl<K, T> Entry<K, T> {
    pub(super) fn seq(&self) -> u64 {
        match self {
            Self::Lone(lone) => lone.seq,
            Self::Shared(flight) => flight.seq,
            Self::Moving => unreachable!("an entry is moving outside a lock section"),
        }
    }

    /// Whether a caller with an equal key joins this flight.
    fn is_visible(&self) -> bool {
        match self {
            Self::Lone(lone) => !lone.forgotten,
            Self::Shared(flight) => flight.registered.load(Ordering::Relaxed),
            Self::Moving => false,
        }
    }

    /// Turns a lone flight shared, moving its key, call and leader's waker
    /// into a flight of its own; its leader takes waker slot 0 there.
    /// Returns the flight, still registered unless it was forgotten.
    pub(super) fn share(
        &mut self,
        hash: u64,
        index: u32,
        shard: &Arc<Shard<K, T>>,
        spawn: Spawn<K, T>,
    ) -> Arc<Flight<K, T>> {
        let Self::Lone(lone) = mem::replace(self, Self::Moving) else {
            unreachable!("only a lone flight turns shared");
        };
        let Lone {
            key,
            seq,
            call,
            waker,
            detach,
            forgotten,
        } = lone;
        let mut state = State::new();
        let slot = state.wakers.insert();
        if let Some(waker) = waker {
            state.wakers.put(slot, waker);
        }
        // No call parked: its leader is polling it, or has yet to make it.
        if call.is_none() {
            state.poller = Some(slot);
        }
        state.call = call;
        let flight = Flight::new(key, hash, seq, index, shard, spawn, detach.is_some(), state);
        flight.registered.store(!forgotten, Ordering::Relaxed);
        flight.leader_moved.store(false, Ordering::Relaxed);
        let flight = Arc::new(flight);
        *self = Self::Shared(Arc::clone(&flight));
        flight
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

#[cfg(all(test, not(singleflight_loom)))]
mod tests {
    use super::*;

    /// The slab slots a table holds on to, over every shard.
    fn capacity(table: &Table<u32, u32>) -> usize {
        let slots = |shard: &Arc<Shard<u32, u32>>| lock(&shard.map).slab.capacity();
        table.shards.iter().map(slots).sum()
    }

    #[test]
    fn a_burst_of_flights_gives_its_memory_back_once_it_ends() {
        let table = Table::<u32, u32>::new();
        let tickets: Vec<_> = (0..10_000)
            .map(|key| {
                let (mut ticket, leads) = table.join(key, false);
                assert!(leads);
                ticket.start(std::future::pending::<Result<u32, crate::Error>>);
                ticket
            })
            .collect();
        assert!(capacity(&table) >= 10_000);

        drop(tickets);
        assert_eq!(table.len(), 0);
        assert_eq!(capacity(&table), 0, "the slabs were not given back");
    }

    #[test]
    fn a_burst_gives_its_memory_back_while_earlier_flights_go_on() {
        let table = Table::<u32, u32>::new();
        let start = |key| {
            let (mut ticket, leads) = table.join(key, false);
            assert!(leads);
            ticket.start(std::future::pending::<Result<u32, crate::Error>>);
            ticket
        };

        // Flights in every shard that outlive the burst after them.
        let long: Vec<_> = (0..256).map(start).collect();
        let burst: Vec<_> = (256..20_256).map(start).collect();
        assert!(capacity(&table) >= 20_256);

        // The burst ends in the order it came: each shard trims its slab.
        drop(burst);
        assert_eq!(table.len(), 256);
        let kept = capacity(&table);
        assert!(
            kept <= 256 * 4 + 64 * 8,
            "{kept} slots kept for 256 flights"
        );

        // The earlier flights still end as usual, each shard keeping at
        // most its few spare slots, and a new burst is served.
        drop(long);
        assert_eq!(table.len(), 0);
        assert!(capacity(&table) <= 64 * table.shards.len());
        let again: Vec<_> = (0..1_000).map(start).collect();
        assert_eq!(table.len(), 1_000);
        drop(again);
        assert_eq!(table.len(), 0);
        assert!(capacity(&table) <= 64 * table.shards.len());
    }
}
