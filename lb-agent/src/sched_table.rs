//! Scheduler tables: which backend a new flow goes to, precomputed by the agent so the per-packet
//! path is one array read. Pure functions over a backend list; the result is a list of indices
//! into that list, which the dataplane turns into backend ids.
//!
//! * [`maglev`]: weighted Maglev (Eisenbud et al., NSDI 2016) for `mh` and `sh`.
//! * [`smooth_wrr`]: the smooth weighted round-robin sequence (nginx's algorithm) for `rr`/`wrr`.

use std::net::IpAddr;

use lb_common::{
    Scheduler,
    hash::{MAGLEV_TABLE_SIZE, murmur3_words},
    wire_addr_v4, wire_addr_v6,
};

use crate::model::Backend;

/// Seeds of the two Maglev permutation hashes ("offset" and "skip" in the paper). Fixed forever:
/// every agent must derive the same permutation for the same backend.
const MAGLEV_OFFSET_SEED: u32 = 0x6d61_676c; // "magl"
const MAGLEV_SKIP_SEED: u32 = 0x736b_6970; // "skip"

/// The words identifying a backend for the Maglev permutation: its address and port.
fn identity(b: &Backend) -> [u32; 5] {
    let a = match b.addr {
        IpAddr::V4(v4) => wire_addr_v4(v4.octets()),
        IpAddr::V6(v6) => wire_addr_v6(v6.octets()),
    };
    [a[0], a[1], a[2], a[3], b.port as u32]
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Weights divided by their greatest common divisor, so 2:2:2 behaves as 1:1:1.
fn reduced_weights(weights: &[u32]) -> Vec<u32> {
    let g = weights.iter().copied().fold(0, gcd);
    if g == 0 {
        weights.to_vec()
    } else {
        weights.iter().map(|w| w / g).collect()
    }
}

/// Fills a Maglev lookup table of [`MAGLEV_TABLE_SIZE`] slots, each the index (into `backends`) of
/// the backend owning it. Backends of weight 0 own no slot. Returns an empty table when no backend
/// has a positive weight.
///
/// Each backend walks its own permutation of the slots (`offset + j * skip mod M`), claiming the
/// next free slot on each of its turns; a backend of weight `w` takes `w` turns per round, so slot
/// shares follow the weights. Turns go in the order of the backends' identities (address, port),
/// not the order given, so the same backend set always yields the same table.
pub fn maglev(backends: &[Backend]) -> Vec<u32> {
    let m = MAGLEV_TABLE_SIZE;
    let mut order: Vec<usize> = (0..backends.len())
        .filter(|&i| backends[i].weight > 0)
        .collect();
    if order.is_empty() {
        return Vec::new();
    }
    order.sort_by_key(|&i| (backends[i].addr, backends[i].port));
    let weights = reduced_weights(
        &order
            .iter()
            .map(|&i| backends[i].weight)
            .collect::<Vec<_>>(),
    );

    // Per backend: current permutation position and step. Both are below `m`, so stepping is an
    // add and at most one subtract: no division in the loop (this loop is most of a full sync).
    let mut cursor: Vec<(u32, u32)> = order
        .iter()
        .map(|&i| {
            let id = identity(&backends[i]);
            let offset = murmur3_words(MAGLEV_OFFSET_SEED, &id) % m;
            let skip = murmur3_words(MAGLEV_SKIP_SEED, &id) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let step = |slot: u32, skip: u32| {
        let next = slot + skip;
        if next >= m { next - m } else { next }
    };

    let mut table = vec![0u32; m as usize];
    // Which slots are taken, one bit each: 2 KiB that stay in L1 while the probes jump around.
    let mut taken = vec![0u64; (m as usize).div_ceil(64)];
    let is_taken = |taken: &[u64], slot: u32| taken[slot as usize / 64] >> (slot % 64) & 1 != 0;
    let mut filled = 0u32;
    'rounds: loop {
        for (k, &i) in order.iter().enumerate() {
            for _ in 0..weights[k] {
                let (mut slot, skip) = cursor[k];
                while is_taken(&taken, slot) {
                    slot = step(slot, skip);
                }
                taken[slot as usize / 64] |= 1 << (slot % 64);
                table[slot as usize] = i as u32;
                cursor[k].0 = step(slot, skip);
                filled += 1;
                if filled == m {
                    break 'rounds;
                }
            }
        }
    }
    table
}

/// The smooth weighted round-robin sequence: one full period of picks, as indices into
/// `backends`. Each step adds every backend's weight to its credit, picks the backend with the
/// most credit (the first one on a tie) and takes the total weight from it. Weights 3:1:1 give
/// `a b a c a`, spreading a heavy backend's picks instead of IPVS's bursty `a a a b c`. Equal
/// weights give plain round robin `a b c`.
///
/// The period is the sum of the gcd-reduced weights; if that exceeds `max_len`, weights are
/// scaled down (each kept at least 1) so the sequence fits the table.
pub fn smooth_wrr(backends: &[Backend], max_len: usize) -> Vec<u32> {
    let live: Vec<usize> = (0..backends.len())
        .filter(|&i| backends[i].weight > 0)
        .collect();
    if live.is_empty() {
        return Vec::new();
    }
    let mut weights =
        reduced_weights(&live.iter().map(|&i| backends[i].weight).collect::<Vec<_>>());
    let total: u64 = weights.iter().map(|&w| w as u64).sum();
    if total > max_len as u64 {
        // Leave room for the max(1) rounding of every backend.
        let budget = (max_len - live.len()) as u64;
        weights = weights
            .iter()
            .map(|&w| 1 + (w as u64 * budget / total) as u32)
            .collect();
        weights = reduced_weights(&weights);
    }
    let total: i64 = weights.iter().map(|&w| w as i64).sum();
    let mut credit = vec![0i64; live.len()];
    (0..total)
        .map(|_| {
            let mut best = 0;
            for k in 0..live.len() {
                credit[k] += weights[k] as i64;
                if credit[k] > credit[best] {
                    best = k;
                }
            }
            credit[best] -= total;
            live[best] as u32
        })
        .collect()
}

/// The table of a service with `scheduler` over `backends`, as indices into `backends`.
pub fn build(scheduler: Scheduler, backends: &[Backend]) -> Vec<u32> {
    let max_len = MAGLEV_TABLE_SIZE as usize;
    match scheduler {
        Scheduler::Maglev | Scheduler::SourceHash => maglev(backends),
        Scheduler::RoundRobin => {
            let equal: Vec<Backend> = backends
                .iter()
                .map(|b| Backend {
                    weight: b.weight.min(1),
                    ..*b
                })
                .collect();
            smooth_wrr(&equal, max_len)
        }
        Scheduler::WeightedRoundRobin => smooth_wrr(backends, max_len),
        Scheduler::LeastConn | Scheduler::WeightedLeastConn => (0..backends.len() as u32)
            .filter(|&i| backends[i as usize].weight > 0)
            .take(max_len)
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends(weights: &[u32]) -> Vec<Backend> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| {
                Backend::ready(
                    IpAddr::from([10, 0, (i / 250) as u8, (i % 250) as u8 + 1]),
                    8080,
                    w,
                )
            })
            .collect()
    }

    fn shares(table: &[u32], n: usize) -> Vec<f64> {
        let mut counts = vec![0usize; n];
        for &i in table {
            counts[i as usize] += 1;
        }
        counts
            .iter()
            .map(|&c| c as f64 / table.len() as f64)
            .collect()
    }

    fn assert_shares(weights: &[u32]) {
        let table = maglev(&backends(weights));
        assert_eq!(table.len(), MAGLEV_TABLE_SIZE as usize);
        let total: u32 = weights.iter().sum();
        for (i, share) in shares(&table, weights.len()).into_iter().enumerate() {
            let want = weights[i] as f64 / total as f64;
            assert!(
                (share - want).abs() <= 0.02,
                "weights {weights:?}: backend {i} has {share:.4}, want {want:.4} ± 0.02"
            );
        }
    }

    #[test]
    fn maglev_equal_weights_give_equal_shares() {
        assert_shares(&[1, 1, 1]);
    }

    #[test]
    fn maglev_honours_weights() {
        assert_shares(&[3, 1, 1]);
        assert_shares(&[5, 2, 2, 1]);
        assert_shares(&[100, 100, 50]);
    }

    #[test]
    fn maglev_weight_zero_owns_nothing() {
        let table = maglev(&backends(&[1, 0, 1]));
        assert!(!table.contains(&1));
        assert!(maglev(&backends(&[0, 0])).is_empty());
        assert!(maglev(&[]).is_empty());
    }

    /// Removing one of N backends must leave the other backends' slots (nearly) where they were:
    /// at most 1.1/N of the slots the survivors owned may change hands.
    #[test]
    fn maglev_removing_a_backend_disrupts_little() {
        for n in [3usize, 5, 10, 20, 50] {
            let all = backends(&vec![1; n]);
            let before = maglev(&all);
            for removed in [0, n / 2, n - 1] {
                let rest: Vec<Backend> = all
                    .iter()
                    .enumerate()
                    .filter(|&(i, _)| i != removed)
                    .map(|(_, b)| *b)
                    .collect();
                let after = maglev(&rest);
                // Map indices of `rest` back to indices of `all`.
                let after: Vec<u32> = after
                    .iter()
                    .map(|&i| if (i as usize) < removed { i } else { i + 1 })
                    .collect();
                let survivor_slots = before.iter().filter(|&&b| b as usize != removed).count();
                let moved = before
                    .iter()
                    .zip(&after)
                    .filter(|&(&b, &a)| b as usize != removed && a != b)
                    .count();
                let fraction = moved as f64 / survivor_slots as f64;
                assert!(
                    fraction <= 1.1 / n as f64,
                    "n={n} removed={removed}: {fraction:.4} of survivor slots moved (limit {:.4})",
                    1.1 / n as f64
                );
            }
        }
    }

    #[test]
    fn maglev_depends_on_the_set_not_the_order() {
        let mut set = backends(&[3, 1, 1, 2]);
        let table = maglev(&set);
        let owners = |t: &[u32], s: &[Backend]| -> Vec<(IpAddr, u16)> {
            t.iter()
                .map(|&i| (s[i as usize].addr, s[i as usize].port))
                .collect()
        };
        let expected = owners(&table, &set);
        set.reverse();
        assert_eq!(owners(&maglev(&set), &set), expected);
        set.swap(0, 2);
        assert_eq!(owners(&maglev(&set), &set), expected);
    }

    /// The textbook population loop (a division per probe, a sentinel for empty slots): the
    /// optimised [`maglev`] must produce exactly its tables, since the program's pick and every
    /// agent's table for the same backend set depend on them.
    fn reference_maglev(backends: &[Backend]) -> Vec<u32> {
        let m = MAGLEV_TABLE_SIZE as u64;
        let mut order: Vec<usize> = (0..backends.len())
            .filter(|&i| backends[i].weight > 0)
            .collect();
        if order.is_empty() {
            return Vec::new();
        }
        order.sort_by_key(|&i| (backends[i].addr, backends[i].port));
        let weights = reduced_weights(
            &order
                .iter()
                .map(|&i| backends[i].weight)
                .collect::<Vec<_>>(),
        );
        let mut cursor: Vec<(u64, u64)> = order
            .iter()
            .map(|&i| {
                let id = identity(&backends[i]);
                (
                    murmur3_words(MAGLEV_OFFSET_SEED, &id) as u64 % m,
                    murmur3_words(MAGLEV_SKIP_SEED, &id) as u64 % (m - 1) + 1,
                )
            })
            .collect();
        let mut table = vec![u32::MAX; m as usize];
        let mut filled = 0;
        'rounds: loop {
            for (k, &i) in order.iter().enumerate() {
                for _ in 0..weights[k] {
                    let (slot, skip) = &mut cursor[k];
                    while table[*slot as usize] != u32::MAX {
                        *slot = (*slot + *skip) % m;
                    }
                    table[*slot as usize] = i as u32;
                    *slot = (*slot + *skip) % m;
                    filled += 1;
                    if filled == m {
                        break 'rounds;
                    }
                }
            }
        }
        table
    }

    #[test]
    fn maglev_matches_the_textbook_population_loop() {
        let mut seed = 0x786c_6221u64;
        for case in 0..50usize {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let n = 1 + (seed >> 33) as usize % 40;
            let set: Vec<Backend> = (0..n)
                .map(|i| {
                    Backend::ready(
                        IpAddr::from([10, case as u8, (i / 250) as u8, (i % 250) as u8 + 1]),
                        8000 + case as u16,
                        ((seed >> (i % 24)) % 4) as u32,
                    )
                })
                .collect();
            assert_eq!(maglev(&set), reference_maglev(&set), "case {case}: {set:?}");
        }
    }

    #[test]
    fn maglev_scales_weights_by_their_gcd() {
        assert_eq!(maglev(&backends(&[2, 2, 2])), maglev(&backends(&[1, 1, 1])));
    }

    #[test]
    fn smooth_wrr_sequence_is_exact() {
        let b = backends(&[3, 1, 1]);
        // a b a c a
        assert_eq!(smooth_wrr(&b, 100), vec![0, 1, 0, 2, 0]);
        assert_eq!(smooth_wrr(&backends(&[1, 1, 1]), 100), vec![0, 1, 2]);
        assert_eq!(smooth_wrr(&backends(&[2, 1]), 100), vec![0, 1, 0]);
        assert_eq!(smooth_wrr(&backends(&[6, 2, 2]), 100), vec![0, 1, 0, 2, 0]);
        assert_eq!(smooth_wrr(&backends(&[1, 0, 1]), 100), vec![0, 2]);
    }

    #[test]
    fn rr_ignores_weights_but_not_zero() {
        let b = backends(&[5, 1, 0, 2]);
        assert_eq!(build(Scheduler::RoundRobin, &b), vec![0, 1, 3]);
    }

    #[test]
    fn smooth_wrr_fits_huge_weights_into_the_table() {
        let b = backends(&[60_000, 20_000, 1]);
        let seq = smooth_wrr(&b, MAGLEV_TABLE_SIZE as usize);
        assert!(seq.len() <= MAGLEV_TABLE_SIZE as usize);
        let s = shares(&seq, 3);
        assert!(
            (s[0] - 0.75).abs() < 0.01 && (s[1] - 0.25).abs() < 0.01,
            "{s:?}"
        );
        assert!(
            seq.contains(&2),
            "every live backend keeps at least one pick"
        );
    }

    #[test]
    fn least_conn_tables_list_live_backends() {
        assert_eq!(
            build(Scheduler::LeastConn, &backends(&[1, 0, 4])),
            vec![0, 2]
        );
    }
}
