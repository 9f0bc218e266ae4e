//! A segment tree over one zone's nodes in their fixed order, holding per resource the
//! most room of any node below each branch (-1 for a node that takes nothing). First fit
//! walks it left to right and skips every branch where some resource has too little room
//! on all of its nodes; a branch can still pass that test without one node having room in
//! every resource at once, so the leaves are checked exactly.

use crate::DIMS;

#[derive(Clone, Debug, Default)]
pub(crate) struct MaxTree {
    /// Leaves in `len..` of a power-of-two layout: node i's leaf is `size + i`.
    size: usize,
    len: usize,
    t: Vec<[i64; DIMS]>,
}

const NONE: [i64; DIMS] = [-1; DIMS];

impl MaxTree {
    pub(crate) fn push(&mut self, room: [i64; DIMS]) {
        if self.len == self.size {
            let leaves: Vec<[i64; DIMS]> = (0..self.len).map(|i| self.get(i)).collect();
            self.size = (self.size * 2).max(1);
            self.t = vec![NONE; 2 * self.size];
            for (i, l) in leaves.into_iter().enumerate() {
                self.t[self.size + i] = l;
            }
            for i in (1..self.size).rev() {
                self.t[i] = max(self.t[2 * i], self.t[2 * i + 1]);
            }
        }
        self.len += 1;
        self.set(self.len - 1, room);
    }

    pub(crate) fn get(&self, pos: usize) -> [i64; DIMS] {
        self.t[self.size + pos]
    }

    pub(crate) fn set(&mut self, pos: usize, room: [i64; DIMS]) {
        let mut i = self.size + pos;
        self.t[i] = room;
        while i > 1 {
            i /= 2;
            self.t[i] = max(self.t[2 * i], self.t[2 * i + 1]);
        }
    }

    /// The first position whose room covers `need` and that `ok` accepts.
    pub(crate) fn first_fit(
        &self,
        need: &[i64; DIMS],
        mut ok: impl FnMut(usize) -> bool,
    ) -> Option<usize> {
        if self.len == 0 {
            return None;
        }
        self.walk(1, need, &mut ok)
    }

    fn walk(
        &self,
        i: usize,
        need: &[i64; DIMS],
        ok: &mut impl FnMut(usize) -> bool,
    ) -> Option<usize> {
        let m = &self.t[i];
        if (0..DIMS).any(|d| m[d] < need[d]) {
            return None;
        }
        if i >= self.size {
            let pos = i - self.size;
            return (pos < self.len && ok(pos)).then_some(pos);
        }
        self.walk(2 * i, need, ok)
            .or_else(|| self.walk(2 * i + 1, need, ok))
    }
}

fn max(a: [i64; DIMS], b: [i64; DIMS]) -> [i64; DIMS] {
    std::array::from_fn(|d| a[d].max(b[d]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn first_fit_is_the_first_leaf_that_fits(
            rooms in proptest::collection::vec(proptest::array::uniform3(-1i64..20), 0..70),
            need in proptest::array::uniform3(0i64..15),
            banned in proptest::collection::btree_set(0usize..70, 0..10),
        ) {
            let mut t = MaxTree::default();
            for r in &rooms {
                t.push(*r);
            }
            let want = rooms
                .iter()
                .enumerate()
                .position(|(i, r)| (0..DIMS).all(|d| r[d] >= need[d]) && !banned.contains(&i));
            prop_assert_eq!(t.first_fit(&need, |p| !banned.contains(&p)), want);
        }
    }
}
