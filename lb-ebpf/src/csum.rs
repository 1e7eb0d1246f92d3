//! Internet checksums (RFC 1071), incremental (RFC 1624) and full. Values are the packet's own
//! bytes read as native integers: one's-complement sums are byte-order independent as long as
//! every operand is read the same way, so nothing is byte-swapped.

/// Folds a 64-bit one's-complement accumulator into 16 bits.
#[inline(always)]
pub fn fold(mut sum: u64) -> u16 {
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// Adds a 32-bit word as two 16-bit words.
#[inline(always)]
pub fn add32(sum: u64, v: u32) -> u64 {
    sum + (v & 0xffff) as u64 + (v >> 16) as u64
}

/// An incremental checksum update: `Delta::new(check)`, then `.replace32`/`.replace16` for every
/// changed field, then `.finish()`. RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m'), which never yields
/// the -0 the older formula could.
#[derive(Clone, Copy)]
pub struct Delta(u64);

impl Delta {
    #[inline(always)]
    pub fn new(check: [u8; 2]) -> Self {
        Self((!u16::from_ne_bytes(check)) as u64)
    }

    #[inline(always)]
    pub fn replace32(self, old: u32, new: u32) -> Self {
        Self(add32(add32(self.0, !old), new))
    }

    #[inline(always)]
    pub fn replace16(self, old: u16, new: u16) -> Self {
        Self(self.0 + (!old) as u64 + new as u64)
    }

    /// Bytes to store back in the checksum field.
    #[inline(always)]
    pub fn finish(self) -> [u8; 2] {
        (!fold(self.0)).to_ne_bytes()
    }
}

/// Sum of `N` 16-bit words, for checksums computed from scratch over data the program wrote.
#[inline(always)]
pub fn sum_words<const N: usize>(words: &[[u8; 2]; N]) -> u64 {
    let mut sum = 0u64;
    let mut i = 0;
    while i < N {
        sum += u16::from_ne_bytes(words[i]) as u64;
        i += 1;
    }
    sum
}

/// A finished checksum over an accumulated sum.
#[inline(always)]
pub fn finish(sum: u64) -> [u8; 2] {
    (!fold(sum)).to_ne_bytes()
}
