//! The wakers of a flight's waiting callers.

use std::mem;
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

    /// Stores `waker` in `slot`, unless the one there wakes the same task.
    pub(super) fn register(&mut self, slot: usize, waker: &Waker) {
        if let Some(Slot::Used(stored)) = self.get_mut(slot) {
            match stored {
                Some(old) if old.will_wake(waker) => {}
                _ => *stored = Some(waker.clone()),
            }
        }
    }

    /// Frees `slot`. After publish there are no slots left to free.
    pub(super) fn remove(&mut self, slot: usize) {
        let free = self.free;
        if let Some(stored) = self.get_mut(slot) {
            *stored = Slot::Free(free);
            self.free = Some(slot);
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

    /// Wakes every waiting caller.
    pub(super) fn wake_all(self) {
        if let Slot::Used(Some(waker)) = self.first {
            waker.wake();
        }
        for slot in self.rest {
            if let Slot::Used(Some(waker)) = slot {
                waker.wake();
            }
        }
    }
}
