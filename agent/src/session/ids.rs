//! Dense identity ids: the smallest free id is handed out first, so ids stay small and are
//! reused once nothing refers to them any more (after expiry, logout or revocation).

use std::collections::BTreeSet;

/// Hands out `1..=max` (0 means "no identity" to the data plane), smallest free id first.
#[derive(Debug)]
pub struct IdAllocator {
    /// Ids released below `next`.
    free: BTreeSet<u32>,
    /// Every id from here on has never been handed out (or was given back at the top).
    next: u32,
    max: u32,
}

impl Default for IdAllocator {
    fn default() -> Self {
        Self::new(u32::MAX)
    }
}

impl IdAllocator {
    /// An allocator of `1..=max`.
    pub fn new(max: u32) -> Self {
        Self {
            free: BTreeSet::new(),
            next: 1,
            max,
        }
    }

    /// The smallest free id, or `None` when all are in use.
    pub fn allocate(&mut self) -> Option<u32> {
        if let Some(id) = self.free.pop_first() {
            return Some(id);
        }
        if self.next == 0 || self.next > self.max {
            return None;
        }
        let id = self.next;
        self.next = self.next.checked_add(1).unwrap_or(0);
        Some(id)
    }

    /// Marks `id` as handed out: an id an earlier run gave out that the kernel still carries.
    /// `false` (and nothing changes) if it is 0, out of range or already handed out.
    pub fn reserve(&mut self, id: u32) -> bool {
        if id == 0 || id > self.max {
            return false;
        }
        if self.next == 0 || id < self.next {
            return self.free.remove(&id);
        }
        // The ids between stay free; adopted ids are dense, so this range is short.
        self.free.extend(self.next..id);
        self.next = id.checked_add(1).unwrap_or(0);
        true
    }

    /// Gives `id` back. Releasing the highest id shrinks the range, so a quiet system returns to
    /// small ids instead of keeping a long free list.
    pub fn release(&mut self, id: u32) {
        if id == 0 || (self.next != 0 && id >= self.next) {
            return;
        }
        if self.next != 0 && id + 1 == self.next {
            self.next = id;
            while let Some(&top) = self.free.last() {
                if top + 1 != self.next {
                    break;
                }
                self.free.pop_last();
                self.next = top;
            }
        } else {
            self.free.insert(id);
        }
    }

    /// Ids currently handed out.
    pub fn in_use(&self) -> usize {
        let issued = if self.next == 0 {
            self.max as usize
        } else {
            self.next as usize - 1
        };
        issued - self.free.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smallest_free_id_first_and_reused() {
        let mut ids = IdAllocator::default();
        assert_eq!(
            [ids.allocate(), ids.allocate(), ids.allocate()],
            [Some(1), Some(2), Some(3)]
        );
        ids.release(2);
        assert_eq!(ids.in_use(), 2);
        assert_eq!(ids.allocate(), Some(2));
        ids.release(1);
        ids.release(3);
        assert_eq!(ids.allocate(), Some(1));
        assert_eq!(ids.allocate(), Some(3));
        assert_eq!(ids.allocate(), Some(4));
    }

    #[test]
    fn releasing_everything_returns_to_one() {
        let mut ids = IdAllocator::default();
        let all: Vec<_> = (0..10).map(|_| ids.allocate().unwrap()).collect();
        for id in [3, 9, 1, 10, 2, 5, 4, 8, 6, 7] {
            ids.release(id);
        }
        assert_eq!(ids.in_use(), 0);
        assert!(
            ids.free.is_empty(),
            "the free list collapses into the range"
        );
        assert_eq!(ids.allocate(), Some(1));
        assert_eq!(all.len(), 10);
    }

    #[test]
    fn bounded_and_ignores_bogus_releases() {
        let mut ids = IdAllocator::new(2);
        assert_eq!(ids.allocate(), Some(1));
        assert_eq!(ids.allocate(), Some(2));
        assert_eq!(ids.allocate(), None);
        ids.release(0);
        ids.release(7);
        assert_eq!(ids.in_use(), 2);
        ids.release(1);
        assert_eq!(ids.allocate(), Some(1));
    }

    #[test]
    fn reserving_ids_an_earlier_run_handed_out() {
        let mut ids = IdAllocator::new(10);
        assert!(ids.reserve(3));
        assert!(!ids.reserve(3), "already handed out");
        assert!(!ids.reserve(0));
        assert!(!ids.reserve(11));
        assert!(ids.reserve(1));
        assert_eq!(ids.in_use(), 2);
        // The gap is handed out first, then the range goes on past the reserved id.
        assert_eq!(ids.allocate(), Some(2));
        assert_eq!(ids.allocate(), Some(4));
        ids.release(3);
        assert_eq!(ids.allocate(), Some(3));
    }
}
