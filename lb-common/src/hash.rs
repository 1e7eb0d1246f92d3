//! The hashes both sides depend on, and the scheduler table size.
//!
//! The program picks a Maglev slot as `flow_hash(key) % MAGLEV_TABLE_SIZE` (source hashing:
//! `source_hash(addr) % MAGLEV_TABLE_SIZE`); the agent fills the table. Keeping both the size and
//! the hash here means a test in the agent can predict exactly which backend the program picks.

use crate::layout::{FlowKey, WireAddr};

/// Slots of a Maglev table: a prime (the Maglev paper requires it so every backend's permutation
/// visits every slot). 16381 is Cilium's default: with the ~100x rule of thumb it keeps the
/// imbalance small for up to ~160 backends per service, at 64 KiB per table.
pub const MAGLEV_TABLE_SIZE: u32 = 16_381;

/// Conntrack `last_seen_ns` is rewritten at most this often, so an established flow does not
/// dirty a shared cache line on every packet. Timeouts are therefore accurate to about 1 s.
pub const CT_TOUCH_INTERVAL_NS: u64 = 1_000_000_000;

const SEED: u32 = 0x786c_6221; // "xlb!"
const C1: u32 = 0xcc9e_2d51;
const C2: u32 = 0x1b87_3593;

/// MurmurHash3's 32-bit finaliser: full avalanche in a few ALU ops.
#[inline(always)]
pub const fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

/// One MurmurHash3 (x86_32) block step.
#[inline(always)]
const fn mix(h: u32, k: u32) -> u32 {
    let k = k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

/// MurmurHash3 (x86_32) of a sequence of words, with a seed. Fixed-length inputs unroll into
/// straight-line code in the program, which the verifier accepts without loops.
#[inline(always)]
pub const fn murmur3_words<const N: usize>(seed: u32, words: &[u32; N]) -> u32 {
    let mut h = seed;
    let mut i = 0;
    while i < N {
        h = mix(h, words[i]);
        i += 1;
    }
    fmix32(h ^ (4 * N as u32))
}

/// Hash of a flow's 5-tuple, for Maglev slot selection. The same for every packet of a flow.
#[inline(always)]
pub const fn flow_hash(key: &FlowKey) -> u32 {
    let s = key.src_addr;
    let d = key.dst_addr;
    murmur3_words(
        SEED,
        &[
            s[0],
            s[1],
            s[2],
            s[3],
            d[0],
            d[1],
            d[2],
            d[3],
            (key.src_port as u32) << 16 | key.dst_port as u32,
            key.proto as u32,
        ],
    )
}

/// Hash of a client address alone, for the `sh` scheduler and session affinity.
#[inline(always)]
pub const fn source_hash(addr: &WireAddr) -> u32 {
    murmur3_words(SEED, addr)
}

/// Slot of a hash in a Maglev table.
#[inline(always)]
pub const fn maglev_slot(hash: u32) -> u32 {
    hash % MAGLEV_TABLE_SIZE
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `murmur3_words` is MurmurHash3_x86_32 over the words' little-endian bytes: check it against
    /// published test vectors, so the program and the agent agree with every other
    /// implementation, not just with each other.
    #[test]
    fn murmur3_matches_the_reference_vectors() {
        assert_eq!(murmur3_words::<0>(0, &[]), 0);
        assert_eq!(murmur3_words::<0>(1, &[]), 0x514e_28b7);
        assert_eq!(
            murmur3_words(0, &[u32::from_le_bytes(*b"test")]),
            0xba6b_d213
        );
        assert_eq!(
            murmur3_words(0x9747_b28c, &[u32::from_le_bytes(*b"aaaa")]),
            0x5a97_808a
        );
        assert_eq!(
            murmur3_words(0x9747_b28c, &[u32::from_le_bytes(*b"abcd")]),
            0xf047_8627
        );
    }

    #[test]
    fn flow_hash_depends_on_every_field_of_the_tuple() {
        let base = FlowKey {
            src_addr: crate::wire_addr_v4([10, 0, 0, 1]),
            dst_addr: crate::wire_addr_v4([10, 96, 0, 10]),
            src_port: 40000u16.to_be(),
            dst_port: 80u16.to_be(),
            proto: crate::proto::TCP,
            family: crate::family::IPV4,
            _pad: 0,
        };
        let h = flow_hash(&base);
        assert_ne!(
            h,
            flow_hash(&FlowKey {
                src_port: 40001u16.to_be(),
                ..base
            })
        );
        assert_ne!(
            h,
            flow_hash(&FlowKey {
                dst_port: 81u16.to_be(),
                ..base
            })
        );
        assert_ne!(
            h,
            flow_hash(&FlowKey {
                src_addr: crate::wire_addr_v4([10, 0, 0, 2]),
                ..base
            })
        );
        assert_ne!(
            h,
            flow_hash(&FlowKey {
                proto: crate::proto::UDP,
                ..base
            })
        );
        assert!(maglev_slot(h) < MAGLEV_TABLE_SIZE);
    }
}
