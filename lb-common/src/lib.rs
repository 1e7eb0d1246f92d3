//! Everything the xlb eBPF program and the agent must agree on, defined once.
//!
//! * [`maps`]: the name (also the pin file name) and capacity of every map.
//! * [`layout`]: the `#[repr(C)]` key and value of every map, with explicit padding so the
//!   kernel, the program and the agent see the same bytes, and BTF shows every field by name.
//! * [`hash`]: the flow hash the program uses to pick a scheduler-table slot, and the table size
//!   the agent builds tables for.
//!
//! Multi-byte fields copied from packets (addresses, ports) are kept in network byte order, exactly
//! as they appear on the wire, so the per-packet path never swaps bytes. Everything else is in host
//! byte order.
#![no_std]

pub mod hash;
pub mod layout;
pub mod maps;

pub use layout::*;

/// Bumped whenever the layout of any pinned map changes. The agent stores it in the config map so
/// that a newer agent finds out whether pinned maps left by an older one can be adopted.
pub const LAYOUT_VERSION: u32 = 1;

/// IP protocol numbers (IANA), as they appear in the IPv4 protocol / IPv6 next-header field.
pub mod proto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ICMPV6: u8 = 58;
    pub const SCTP: u8 = 132;
}

/// Address family tag stored in keys. IPv4 addresses use the first 4 of the 16 address bytes and
/// leave the rest zero.
pub mod family {
    pub const IPV4: u8 = 4;
    pub const IPV6: u8 = 6;
}
