//! Which examples go into each training step.
//!
//! The model takes a batch as a list of variable-length sequences flattened into one matrix, so
//! there is no padding; "packing" here means filling a batch up to a token budget
//! ([`pack_by_tokens`]) instead of to a number of examples.
//!
//! A [`BatchPlan`] is a pure function of `(seed, step)`: a checkpoint stores only the step, and a
//! resumed run rebuilds the plan from the seed and continues with exactly the batches an
//! uninterrupted run would have seen.

use super::shuffle::permutation;

/// The batches of every epoch, each epoch in its own seeded order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchPlan {
    seed: u64,
    kind: Kind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    /// Consecutive runs of `batch_size` in a per-epoch permutation of `0..n_examples`.
    Fixed { n_examples: usize, batch_size: usize },
    /// Fixed batches (from [`pack_by_tokens`]) visited in a per-epoch order.
    Packed(Vec<Vec<usize>>),
}

impl BatchPlan {
    /// Batches of `batch_size` examples (the last of an epoch may be smaller), drawn from a fresh
    /// permutation of `0..n_examples` each epoch, so every example is seen once per epoch.
    /// A `batch_size` of 0 is taken as 1.
    pub fn new(n_examples: usize, batch_size: usize, seed: u64) -> Self {
        BatchPlan { seed, kind: Kind::Fixed { n_examples, batch_size: batch_size.max(1) } }
    }

    /// The given batches (say from [`pack_by_tokens`]), their contents fixed and their order
    /// reshuffled every epoch. Empty batches are left out.
    pub fn packed(batches: Vec<Vec<usize>>, seed: u64) -> Self {
        let batches = batches.into_iter().filter(|b| !b.is_empty()).collect();
        BatchPlan { seed, kind: Kind::Packed(batches) }
    }

    /// Number of batches in one epoch (0 for no examples).
    pub fn batches_per_epoch(&self) -> usize {
        match &self.kind {
            Kind::Fixed { n_examples, batch_size } => n_examples.div_ceil(*batch_size),
            Kind::Packed(batches) => batches.len(),
        }
    }

    /// The epoch that global step `step` falls in.
    pub fn epoch(&self, step: usize) -> usize {
        step.checked_div(self.batches_per_epoch()).unwrap_or(0)
    }

    /// The batch at global position `step`, as example indices: epoch `step / batches_per_epoch`,
    /// batch `step % batches_per_epoch` of that epoch's order. Depends on nothing but the plan's
    /// arguments and `step`. Empty only when the plan has no examples.
    ///
    /// Costs one shuffle of the epoch (O(examples)), negligible beside a training step.
    pub fn batch(&self, step: usize) -> Vec<usize> {
        let per_epoch = self.batches_per_epoch();
        if per_epoch == 0 {
            return Vec::new();
        }
        let (epoch, index) = (step / per_epoch, step % per_epoch);
        match &self.kind {
            Kind::Fixed { n_examples, batch_size } => {
                let order = permutation(*n_examples, self.seed, epoch as u64);
                let start = index * batch_size;
                let end = (start + batch_size).min(*n_examples);
                order[start..end].to_vec()
            }
            Kind::Packed(batches) => {
                let order = permutation(batches.len(), self.seed, epoch as u64);
                batches[order[index]].clone()
            }
        }
    }
}

/// Groups examples of the given token `lengths` into batches of at most `max_tokens` tokens each,
/// first-fit decreasing: longest first (ties by index), each into the first batch with room, a new
/// batch when none has. Deterministic. An example longer than `max_tokens` gets a batch of its own
/// (it cannot be split; truncate at load to avoid it). Batches are listed in the order they were
/// opened, each with its examples in the order they were placed.
pub fn pack_by_tokens(lengths: &[usize], max_tokens: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    // Stable sort: equal lengths keep index order.
    order.sort_by(|&a, &b| lengths[b].cmp(&lengths[a]));
    let mut batches: Vec<Vec<usize>> = Vec::new();
    let mut used: Vec<usize> = Vec::new();
    for i in order {
        let len = lengths[i];
        match used.iter().position(|&u| u + len <= max_tokens) {
            Some(b) => {
                batches[b].push(i);
                used[b] += len;
            }
            None => {
                batches.push(vec![i]);
                used.push(len);
            }
        }
    }
    batches
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_batch_of_an_epoch_may_be_short() {
        let plan = BatchPlan::new(10, 4, 1);
        assert_eq!(plan.batches_per_epoch(), 3);
        let sizes: Vec<usize> = (0..6).map(|s| plan.batch(s).len()).collect();
        assert_eq!(sizes, [4, 4, 2, 4, 4, 2]);
        assert_eq!(plan.epoch(5), 1);
    }

    #[test]
    fn empty_plan_gives_empty_batches() {
        let plan = BatchPlan::new(0, 4, 1);
        assert_eq!(plan.batches_per_epoch(), 0);
        assert!(plan.batch(7).is_empty());
        assert_eq!(BatchPlan::new(3, 0, 1).batches_per_epoch(), 3);
    }

    #[test]
    fn first_fit_decreasing() {
        // Sorted: 6(0) 5(2) 4(1) 3(3) 2(4) 1(5); budget 8.
        assert_eq!(pack_by_tokens(&[6, 4, 5, 3, 2, 1], 8), vec![vec![0, 4], vec![2, 3], vec![1, 5]]);
        assert_eq!(pack_by_tokens(&[9, 1], 4), vec![vec![0], vec![1]]);
        assert!(pack_by_tokens(&[], 4).is_empty());
    }

    #[test]
    fn packed_plan_visits_each_batch_once_per_epoch() {
        let batches = vec![vec![0, 4], vec![2, 3], vec![1, 5], vec![]];
        let plan = BatchPlan::packed(batches.clone(), 9);
        assert_eq!(plan.batches_per_epoch(), 3);
        for epoch in 0..3 {
            let mut seen: Vec<Vec<usize>> = (0..3).map(|i| plan.batch(epoch * 3 + i)).collect();
            seen.sort();
            assert_eq!(seen, vec![vec![0, 4], vec![1, 5], vec![2, 3]]);
        }
    }
}
