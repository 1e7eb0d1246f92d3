//! The dummy interface that holds the VIPs (`kube-ipvs0`, kube-proxy's convention), over
//! rtnetlink with netlink-packet-route's message types.
//!
//! IPVS intercepts packets in the netfilter LOCAL_IN hook, so a VIP must be a local address of
//! the node or its packets are routed away before IPVS sees them. A dummy interface makes each VIP
//! local without answering for it on any real link. Like kube-proxy, the interface is left down:
//! the kernel still installs the local route of each address, and nothing else is needed.

use std::{collections::BTreeSet, net::IpAddr};

use anyhow::Context as _;
use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    address::{AddressAttribute, AddressHeaderFlags, AddressMessage},
    link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage},
};
use tracing::info;

use super::netlink::{Expect, NETLINK_ROUTE, NetlinkConn, errno_of};

/// kube-proxy's name for the interface; sharing it keeps node tooling and habits working.
pub const DEFAULT_VIP_IFACE: &str = "kube-ipvs0";

/// The VIP interface and the addresses on it.
pub struct VipInterface {
    conn: NetlinkConn,
    name: String,
    index: u32,
}

/// RTM_GETLINK for one interface by name.
pub fn get_link(name: &str) -> RouteNetlinkMessage {
    let mut link = LinkMessage::default();
    link.attributes.push(LinkAttribute::IfName(name.to_owned()));
    RouteNetlinkMessage::GetLink(link)
}

/// RTM_NEWLINK of a dummy interface (sent with NLM_F_CREATE | NLM_F_EXCL).
pub fn new_dummy_link(name: &str) -> RouteNetlinkMessage {
    let mut link = LinkMessage::default();
    link.attributes.push(LinkAttribute::IfName(name.to_owned()));
    link.attributes
        .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(
            InfoKind::Dummy,
        )]));
    RouteNetlinkMessage::NewLink(link)
}

/// A host address (/32 or /128) on interface `index`; IPv6 without duplicate address detection,
/// which would hold it tentative on an interface that never comes up.
pub fn address_message(index: u32, addr: IpAddr) -> AddressMessage {
    let mut msg = AddressMessage::default();
    msg.header.index = index;
    match addr {
        IpAddr::V4(_) => {
            msg.header.family = AddressFamily::Inet;
            msg.header.prefix_len = 32;
        }
        IpAddr::V6(_) => {
            msg.header.family = AddressFamily::Inet6;
            msg.header.prefix_len = 128;
            msg.header.flags = AddressHeaderFlags::Nodad;
        }
    }
    msg.attributes.push(AddressAttribute::Local(addr));
    msg.attributes.push(AddressAttribute::Address(addr));
    msg
}

impl VipInterface {
    /// Opens the interface `name`, creating it as a dummy interface if it does not exist.
    pub fn ensure(name: &str) -> anyhow::Result<Self> {
        let mut conn = NetlinkConn::open(NETLINK_ROUTE, "rtnetlink").context("open rtnetlink")?;
        let index = match Self::lookup(&mut conn, name) {
            Ok(index) => index,
            Err(e) if errno_of(&e) == Some(libc::ENODEV) => {
                conn.request(new_dummy_link(name), Expect::Ack, NLM_F_CREATE | NLM_F_EXCL)
                    .with_context(|| {
                        format!(
                            "create the dummy interface {name} (does the kernel have the dummy \
                             driver, CONFIG_DUMMY?)"
                        )
                    })?;
                info!(iface = name, "created the VIP interface");
                Self::lookup(&mut conn, name)?
            }
            Err(e) => return Err(e.context(format!("look up interface {name}"))),
        };
        Ok(Self {
            conn,
            name: name.to_owned(),
            index,
        })
    }

    /// Opens the interface `name` if it exists (never creates it).
    pub fn open_existing(name: &str) -> anyhow::Result<Option<Self>> {
        let mut conn = NetlinkConn::open(NETLINK_ROUTE, "rtnetlink").context("open rtnetlink")?;
        match Self::lookup(&mut conn, name) {
            Ok(index) => Ok(Some(Self {
                conn,
                name: name.to_owned(),
                index,
            })),
            Err(e) if errno_of(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e.context(format!("look up interface {name}"))),
        }
    }

    /// Deletes the interface, and with it every address on it.
    pub fn delete(mut self) -> anyhow::Result<()> {
        let mut link = LinkMessage::default();
        link.header.index = self.index;
        self.conn
            .request(RouteNetlinkMessage::DelLink(link), Expect::Ack, 0)
            .with_context(|| format!("delete interface {}", self.name))?;
        Ok(())
    }

    fn lookup(conn: &mut NetlinkConn, name: &str) -> anyhow::Result<u32> {
        conn.request(get_link(name), Expect::Ack, 0)?
            .into_iter()
            .find_map(|m| match m {
                RouteNetlinkMessage::NewLink(link) => Some(link.header.index),
                _ => None,
            })
            .with_context(|| format!("the kernel answered no link for {name}"))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Every address on the interface.
    pub fn addresses(&mut self) -> anyhow::Result<BTreeSet<IpAddr>> {
        let replies = self
            .conn
            .request(
                RouteNetlinkMessage::GetAddress(AddressMessage::default()),
                Expect::Dump,
                0,
            )
            .with_context(|| format!("list the addresses of {}", self.name))?;
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) if a.header.index == self.index => {
                    a.attributes.into_iter().find_map(|attr| match attr {
                        AddressAttribute::Local(ip) => Some(ip),
                        AddressAttribute::Address(ip) => Some(ip),
                        _ => None,
                    })
                }
                _ => None,
            })
            .collect())
    }

    /// Binds `addr` to the interface; already bound is fine.
    pub fn add(&mut self, addr: IpAddr) -> anyhow::Result<()> {
        let msg = RouteNetlinkMessage::NewAddress(address_message(self.index, addr));
        match self
            .conn
            .request(msg, Expect::Ack, NLM_F_CREATE | NLM_F_EXCL)
        {
            Ok(_) => Ok(()),
            Err(e) if errno_of(&e) == Some(libc::EEXIST) => Ok(()),
            Err(e) => Err(e.context(format!("add {addr} to {}", self.name))),
        }
    }

    /// Unbinds `addr`; already gone is fine.
    pub fn remove(&mut self, addr: IpAddr) -> anyhow::Result<()> {
        let msg = RouteNetlinkMessage::DelAddress(address_message(self.index, addr));
        match self.conn.request(msg, Expect::Ack, 0) {
            Ok(_) => Ok(()),
            Err(e) if errno_of(&e) == Some(libc::EADDRNOTAVAIL) => Ok(()),
            Err(e) => Err(e.context(format!("remove {addr} from {}", self.name))),
        }
    }
}

#[cfg(test)]
mod tests {
    //! rtnetlink requests pinned byte for byte against rtnetlink.h / if_addr.h / if_link.h
    //! layouts, written out by hand.

    use netlink_packet_core::{NLM_F_ACK, NLM_F_REQUEST};

    use super::*;
    use crate::dataplane::ipvs::netlink::encode;

    fn nla(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(value);
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
        out
    }

    fn message(msg_type: u16, flags: u16, header: &[u8], attrs: &[Vec<u8>]) -> Vec<u8> {
        let body = [header.to_vec(), attrs.concat()].concat();
        let mut out = Vec::new();
        out.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
        out.extend_from_slice(&msg_type.to_ne_bytes());
        out.extend_from_slice(&flags.to_ne_bytes());
        out.extend_from_slice(&1u32.to_ne_bytes());
        out.extend_from_slice(&0u32.to_ne_bytes());
        out.extend_from_slice(&body);
        out
    }

    const ACK: u16 = NLM_F_REQUEST | NLM_F_ACK;

    #[test]
    fn new_dummy_link_is_named_with_kind_dummy() {
        // struct ifinfomsg: family, pad, type, index, flags, change (16 bytes, all zero).
        let ifinfo = [0u8; 16];
        let flags = ACK | NLM_F_CREATE | NLM_F_EXCL;
        assert_eq!(
            encode(new_dummy_link("kube-ipvs0"), flags, 1),
            message(
                16, // RTM_NEWLINK
                flags,
                &ifinfo,
                &[
                    nla(3, b"kube-ipvs0\0"), // IFLA_IFNAME
                    // IFLA_LINKINFO { IFLA_INFO_KIND }: NUL-terminated, which the kernel's
                    // NLA_STRING policy accepts as well as iproute2's unterminated form.
                    nla(18, &nla(1, b"dummy\0")),
                ]
            )
        );
    }

    #[test]
    fn ipv4_vip_is_a_host_address() {
        // struct ifaddrmsg: family AF_INET, prefixlen 32, flags 0, scope 0, index 7.
        let ifaddr = [2, 32, 0, 0, 7, 0, 0, 0];
        let addr = [10, 96, 0, 10];
        let flags = ACK | NLM_F_CREATE | NLM_F_EXCL;
        assert_eq!(
            encode(
                RouteNetlinkMessage::NewAddress(address_message(7, "10.96.0.10".parse().unwrap())),
                flags,
                1
            ),
            message(
                20, // RTM_NEWADDR
                flags,
                &ifaddr,
                &[nla(2, &addr), nla(1, &addr)] // IFA_LOCAL, IFA_ADDRESS
            )
        );
    }

    #[test]
    fn ipv6_vip_skips_duplicate_address_detection() {
        let addr: std::net::Ipv6Addr = "fd00::10".parse().unwrap();
        // AF_INET6 10, prefixlen 128, IFA_F_NODAD 0x02.
        let ifaddr = [10, 128, 0x02, 0, 7, 0, 0, 0];
        assert_eq!(
            encode(
                RouteNetlinkMessage::DelAddress(address_message(7, addr.into())),
                ACK,
                1
            ),
            message(
                21, // RTM_DELADDR
                ACK,
                &ifaddr,
                &[nla(2, &addr.octets()), nla(1, &addr.octets())]
            )
        );
    }
}
