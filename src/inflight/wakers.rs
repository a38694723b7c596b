//! The wakers of a flight's waiting callers.

use std::any::Any;
use std::mem;
use std::panic::{self, AssertUnwindSafe};
use std::task::Waker;

/// A slab of waiter wakers: a slot per waiting caller, reused once freed.
///
/// The first slot is kept inline, so a flight with one caller (the common
/// case when keys rarely repeat) allocates nothing for its wakers.
#[derive(Default)]
pub(super) struct Wakers {
    /// Slot 0.
    first: Slot,
    /// Slots 1 and up.
    rest: Vec<Slot>,
    /// How many slots exist; none once the wakers are taken at publish.
    len: usize,
    /// Head of the list of free slots.
    free: Option<usize>,
}

#[derive(Default)]
enum Slot {
    #[default]
    Unused,
    Free(Option<usize>),
    Used(Option<Waker>),
}

impl Wakers {
    fn get_mut(&mut self, slot: usize) -> Option<&mut Slot> {
        match slot {
            _ if slot >= self.len => None,
            0 => Some(&mut self.first),
            _ => self.rest.get_mut(slot - 1),
        }
    }

    pub(super) fn insert(&mut self) -> usize {
        if let Some(index) = self.free {
            let slot = self.get_mut(index).expect("the free list holds live slots");
            let Slot::Free(next) = mem::replace(slot, Slot::Used(None)) else {
                unreachable!("the free list points at a used slot");
            };
            self.free = next;
            return index;
        }
        if self.len == 0 {
            self.first = Slot::Used(None);
        } else {
            self.rest.push(Slot::Used(None));
        }
        self.len += 1;
        self.len - 1
    }

    /// Moves `waker` into `slot`, new and empty.
    pub(super) fn put(&mut self, slot: usize, waker: Waker) {
        if let Some(Slot::Used(stored)) = self.get_mut(slot) {
            debug_assert!(stored.is_none(), "a new slot holds no waker");
            *stored = Some(waker);
        }
    }

    /// Stores `waker` in `slot`, unless the one there wakes the same task.
    /// Returns the waker it replaced: a waker's drop is user code, for the
    /// caller to run once it has let go of its locks.
    #[must_use = "a replaced waker is dropped with no lock held"]
    pub(super) fn register(&mut self, slot: usize, waker: &Waker) -> Option<Waker> {
        let Some(Slot::Used(stored)) = self.get_mut(slot) else {
            return None;
        };
        match stored {
            Some(old) if old.will_wake(waker) => None,
            _ => stored.replace(waker.clone()),
        }
    }

    /// Frees `slot`, returning its waker for the caller to drop with no
    /// lock held. After publish there are no slots left to free.
    #[must_use = "a freed slot's waker is dropped with no lock held"]
    pub(super) fn remove(&mut self, slot: usize) -> Option<Waker> {
        let free = self.free;
        let stored = self.get_mut(slot)?;
        let freed = mem::replace(stored, Slot::Free(free));
        self.free = Some(slot);
        match freed {
            Slot::Used(waker) => waker,
            Slot::Unused | Slot::Free(_) => None,
        }
    }

    /// Takes the waker of one waiting caller, and its slot, to hand a
    /// parked call over.
    pub(super) fn take_one(&mut self) -> Option<(usize, Waker)> {
        let slots = [&mut self.first].into_iter().chain(&mut self.rest);
        slots
            .take(self.len)
            .enumerate()
            .find_map(|(index, slot)| match slot {
                Slot::Used(waker) => Some(index).zip(waker.take()),
                Slot::Unused | Slot::Free(_) => None,
            })
    }

    /// Wakes every waiting caller. A waker that panics does not keep the
    /// others asleep: they are all woken, and the first panic is handed
    /// back, for the caller to resume once it has finished its own work.
    #[must_use = "a waker's panic is resumed by the caller"]
    pub(super) fn wake_all(self) -> Option<Box<dyn Any + Send>> {
        let mut panicked = None;
        for slot in std::iter::once(self.first).chain(self.rest) {
            if let Slot::Used(Some(waker)) = slot {
                if let Err(payload) = panic::catch_unwind(AssertUnwindSafe(|| waker.wake())) {
                    panicked.get_or_insert(payload);
                }
            }
        }
        panicked
    }
}
