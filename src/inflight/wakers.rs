//! The wakers of a flight's waiting tickets.

use std::task::Waker;

/// A slab of waiter wakers: a slot per waiting ticket, reused once freed.
#[derive(Default)]
pub(super) struct Wakers {
    slots: Vec<Slot>,
    /// Head of the list of free slots.
    free: Option<usize>,
}

enum Slot {
    Free(Option<usize>),
    Used(Option<Waker>),
}

impl Wakers {
    pub(super) fn insert(&mut self) -> usize {
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
    pub(super) fn register(&mut self, slot: usize, waker: &Waker) {
        if let Some(Slot::Used(stored)) = self.slots.get_mut(slot) {
            match stored {
                Some(old) if old.will_wake(waker) => {}
                _ => *stored = Some(waker.clone()),
            }
        }
    }

    pub(super) fn remove(&mut self, slot: usize) {
        // After publish the slab is empty; nothing is left to free.
        if slot < self.slots.len() {
            self.slots[slot] = Slot::Free(self.free);
            self.free = Some(slot);
        }
    }

    /// Takes the waker of one waiting ticket, and its slot, to hand a
    /// parked call over.
    pub(super) fn take_one(&mut self) -> Option<(usize, Waker)> {
        let mut slots = self.slots.iter_mut().enumerate();
        slots.find_map(|(index, slot)| match slot {
            Slot::Used(waker) => Some(index).zip(waker.take()),
            Slot::Free(_) => None,
        })
    }

    pub(super) fn wake_all(self) {
        for slot in self.slots {
            if let Slot::Used(Some(waker)) = slot {
                waker.wake();
            }
        }
    }
}
