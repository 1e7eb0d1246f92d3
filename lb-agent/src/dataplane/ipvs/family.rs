//! The kernel's "IPVS" generic netlink family, from include/uapi/linux/ip_vs.h: commands,
//! attributes and their encodings, on top of netlink-packet-core's `Nla` and
//! netlink-packet-generic's `GenlFamily` (no maintained crate implements this family).
//!
//! Two layers: the wire vocabulary ([`IpvsMessage`], [`IpvsAttr`], [`ServiceAttr`],
//! [`DestAttr`]) and the objects the dataplane reasons about ([`VirtualService`],
//! [`RealServer`]) with the requests built from them and the replies parsed into them.
//!
//! Encodings follow what the kernel parses (net/netfilter/ipvs/ip_vs_ctl.c) and what ipvsadm
//! sends: addresses are a 16-byte `union nf_inet_addr`, ports and the IPv4 netmask are in network
//! byte order, nested attributes carry no NLA_F_NESTED flag (the family is parsed leniently and
//! the kernel's own replies omit it).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{Context as _, anyhow, bail};
use netlink_packet_core::{
    DecodeError, DefaultNla, Emitable, Nla, NlaBuffer, NlasIterator, Parseable,
    ParseableParametrized, emit_u16, emit_u32, parse_string, parse_u16, parse_u32,
};
use netlink_packet_generic::{GenlFamily, GenlHeader};

use crate::{model::Protocol, plan::FrontendKey};

/// `IPVS_GENL_NAME`.
pub const FAMILY_NAME: &str = "IPVS";
/// `IPVS_GENL_VERSION`.
pub const FAMILY_VERSION: u8 = 1;

// enum IPVS_CMD_*
const CMD_NEW_SERVICE: u8 = 1;
const CMD_SET_SERVICE: u8 = 2;
const CMD_DEL_SERVICE: u8 = 3;
const CMD_GET_SERVICE: u8 = 4;
const CMD_NEW_DEST: u8 = 5;
const CMD_SET_DEST: u8 = 6;
const CMD_DEL_DEST: u8 = 7;
const CMD_GET_DEST: u8 = 8;

// enum IPVS_CMD_ATTR_*
const CMD_ATTR_SERVICE: u16 = 1;
const CMD_ATTR_DEST: u16 = 2;

// enum IPVS_SVC_ATTR_*
const SVC_ATTR_AF: u16 = 1;
const SVC_ATTR_PROTOCOL: u16 = 2;
const SVC_ATTR_ADDR: u16 = 3;
const SVC_ATTR_PORT: u16 = 4;
const SVC_ATTR_FWMARK: u16 = 5;
const SVC_ATTR_SCHED_NAME: u16 = 6;
const SVC_ATTR_FLAGS: u16 = 7;
const SVC_ATTR_TIMEOUT: u16 = 8;
const SVC_ATTR_NETMASK: u16 = 9;
const SVC_ATTR_PE_NAME: u16 = 11;

// enum IPVS_DEST_ATTR_*
const DEST_ATTR_ADDR: u16 = 1;
const DEST_ATTR_PORT: u16 = 2;
const DEST_ATTR_FWD_METHOD: u16 = 3;
const DEST_ATTR_WEIGHT: u16 = 4;
const DEST_ATTR_U_THRESH: u16 = 5;
const DEST_ATTR_L_THRESH: u16 = 6;
const DEST_ATTR_ACTIVE_CONNS: u16 = 7;
const DEST_ATTR_INACT_CONNS: u16 = 8;
const DEST_ATTR_PERSIST_CONNS: u16 = 9;
const DEST_ATTR_ADDR_FAMILY: u16 = 11;

/// `IP_VS_SVC_F_PERSISTENT`: ClientIP affinity, for `timeout` seconds.
pub const SVC_F_PERSISTENT: u32 = 0x0001;
/// `IP_VS_SVC_F_HASHED`: set by the kernel on every service it holds; never ours to set.
pub const SVC_F_HASHED: u32 = 0x0002;
/// `IP_VS_CONN_F_FWD_MASK`.
pub const CONN_F_FWD_MASK: u32 = 0x0007;
/// `IP_VS_CONN_F_MASQ`: NAT to the real server (kube-proxy's forwarding method).
pub const CONN_F_MASQ: u32 = 0x0000;

/// `union nf_inet_addr`: an IPv4 address fills the first 4 bytes.
const INET_ADDR_LEN: usize = 16;

/// `AF_INET` / `AF_INET6` as IPVS carries them (u16).
fn address_family(addr: IpAddr) -> u16 {
    match addr {
        IpAddr::V4(_) => libc::AF_INET as u16,
        IpAddr::V6(_) => libc::AF_INET6 as u16,
    }
}

fn inet_addr(addr: IpAddr) -> [u8; INET_ADDR_LEN] {
    let mut out = [0; INET_ADDR_LEN];
    match addr {
        IpAddr::V4(a) => out[..4].copy_from_slice(&a.octets()),
        IpAddr::V6(a) => out.copy_from_slice(&a.octets()),
    }
    out
}

fn ip_from_inet(af: u16, raw: &[u8; INET_ADDR_LEN]) -> anyhow::Result<IpAddr> {
    match i32::from(af) {
        libc::AF_INET => Ok(IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))),
        libc::AF_INET6 => Ok(IpAddr::V6(Ipv6Addr::from(*raw))),
        other => bail!("unknown address family {other}"),
    }
}

/// The persistence netmask xlb writes: one client address per affinity entry (IPv4 takes a mask,
/// IPv6 a prefix length, both as the kernel reads them).
pub fn full_netmask(addr: IpAddr) -> u32 {
    match addr {
        IpAddr::V4(_) => u32::MAX,
        IpAddr::V6(_) => 128,
    }
}

/// An IPVS command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IpvsCmd {
    NewService,
    SetService,
    DelService,
    GetService,
    NewDest,
    SetDest,
    DelDest,
    GetDest,
    Other(u8),
}

impl From<IpvsCmd> for u8 {
    fn from(cmd: IpvsCmd) -> u8 {
        match cmd {
            IpvsCmd::NewService => CMD_NEW_SERVICE,
            IpvsCmd::SetService => CMD_SET_SERVICE,
            IpvsCmd::DelService => CMD_DEL_SERVICE,
            IpvsCmd::GetService => CMD_GET_SERVICE,
            IpvsCmd::NewDest => CMD_NEW_DEST,
            IpvsCmd::SetDest => CMD_SET_DEST,
            IpvsCmd::DelDest => CMD_DEL_DEST,
            IpvsCmd::GetDest => CMD_GET_DEST,
            IpvsCmd::Other(n) => n,
        }
    }
}

impl From<u8> for IpvsCmd {
    fn from(n: u8) -> Self {
        match n {
            CMD_NEW_SERVICE => Self::NewService,
            CMD_SET_SERVICE => Self::SetService,
            CMD_DEL_SERVICE => Self::DelService,
            CMD_GET_SERVICE => Self::GetService,
            CMD_NEW_DEST => Self::NewDest,
            CMD_SET_DEST => Self::SetDest,
            CMD_DEL_DEST => Self::DelDest,
            CMD_GET_DEST => Self::GetDest,
            n => Self::Other(n),
        }
    }
}

/// Attributes of the first level (`IPVS_CMD_ATTR_*`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IpvsAttr {
    Service(Vec<ServiceAttr>),
    Dest(Vec<DestAttr>),
    Other(DefaultNla),
}

/// Attributes nested in `IPVS_CMD_ATTR_SERVICE`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServiceAttr {
    AddressFamily(u16),
    Protocol(u16),
    Address([u8; INET_ADDR_LEN]),
    /// Host order here, network order on the wire.
    Port(u16),
    FwMark(u32),
    SchedName(String),
    /// `struct ip_vs_flags`: the kernel applies `flags` under `mask`.
    Flags {
        flags: u32,
        mask: u32,
    },
    /// Persistence timeout, seconds.
    Timeout(u32),
    /// Persistence netmask: an IPv4 mask in network order, or an IPv6 prefix length.
    Netmask(u32),
    PeName(String),
    Other(DefaultNla),
}

/// Attributes nested in `IPVS_CMD_ATTR_DEST`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DestAttr {
    Address([u8; INET_ADDR_LEN]),
    /// Host order here, network order on the wire.
    Port(u16),
    FwdMethod(u32),
    Weight(u32),
    UpperThreshold(u32),
    LowerThreshold(u32),
    ActiveConns(u32),
    InactiveConns(u32),
    PersistConns(u32),
    AddressFamily(u16),
    Other(DefaultNla),
}

fn nested_len<T: Nla>(attrs: &[T]) -> usize {
    attrs.buffer_len()
}

impl Nla for IpvsAttr {
    fn value_len(&self) -> usize {
        match self {
            Self::Service(a) => nested_len(a),
            Self::Dest(a) => nested_len(a),
            Self::Other(a) => a.value_len(),
        }
    }

    fn kind(&self) -> u16 {
        match self {
            Self::Service(_) => CMD_ATTR_SERVICE,
            Self::Dest(_) => CMD_ATTR_DEST,
            Self::Other(a) => a.kind(),
        }
    }

    fn emit_value(&self, buffer: &mut [u8]) {
        match self {
            Self::Service(a) => a.as_slice().emit(buffer),
            Self::Dest(a) => a.as_slice().emit(buffer),
            Self::Other(a) => a.emit_value(buffer),
        }
    }
}

impl Nla for ServiceAttr {
    fn value_len(&self) -> usize {
        match self {
            Self::AddressFamily(_) | Self::Protocol(_) | Self::Port(_) => 2,
            Self::Address(_) => INET_ADDR_LEN,
            Self::FwMark(_) | Self::Timeout(_) | Self::Netmask(_) => 4,
            Self::SchedName(s) | Self::PeName(s) => s.len() + 1,
            Self::Flags { .. } => 8,
            Self::Other(a) => a.value_len(),
        }
    }

    fn kind(&self) -> u16 {
        match self {
            Self::AddressFamily(_) => SVC_ATTR_AF,
            Self::Protocol(_) => SVC_ATTR_PROTOCOL,
            Self::Address(_) => SVC_ATTR_ADDR,
            Self::Port(_) => SVC_ATTR_PORT,
            Self::FwMark(_) => SVC_ATTR_FWMARK,
            Self::SchedName(_) => SVC_ATTR_SCHED_NAME,
            Self::Flags { .. } => SVC_ATTR_FLAGS,
            Self::Timeout(_) => SVC_ATTR_TIMEOUT,
            Self::Netmask(_) => SVC_ATTR_NETMASK,
            Self::PeName(_) => SVC_ATTR_PE_NAME,
            Self::Other(a) => a.kind(),
        }
    }

    fn emit_value(&self, buffer: &mut [u8]) {
        match self {
            Self::AddressFamily(v) | Self::Protocol(v) => emit_u16(buffer, *v).unwrap(),
            Self::Port(p) => buffer[..2].copy_from_slice(&p.to_be_bytes()),
            Self::Address(a) => buffer.copy_from_slice(a),
            Self::FwMark(v) | Self::Timeout(v) | Self::Netmask(v) => emit_u32(buffer, *v).unwrap(),
            Self::SchedName(s) | Self::PeName(s) => {
                buffer[..s.len()].copy_from_slice(s.as_bytes());
                buffer[s.len()] = 0;
            }
            Self::Flags { flags, mask } => {
                emit_u32(&mut buffer[..4], *flags).unwrap();
                emit_u32(&mut buffer[4..8], *mask).unwrap();
            }
            Self::Other(a) => a.emit_value(buffer),
        }
    }
}

impl Nla for DestAttr {
    fn value_len(&self) -> usize {
        match self {
            Self::Port(_) | Self::AddressFamily(_) => 2,
            Self::Address(_) => INET_ADDR_LEN,
            Self::FwdMethod(_)
            | Self::Weight(_)
            | Self::UpperThreshold(_)
            | Self::LowerThreshold(_)
            | Self::ActiveConns(_)
            | Self::InactiveConns(_)
            | Self::PersistConns(_) => 4,
            Self::Other(a) => a.value_len(),
        }
    }

    fn kind(&self) -> u16 {
        match self {
            Self::Address(_) => DEST_ATTR_ADDR,
            Self::Port(_) => DEST_ATTR_PORT,
            Self::FwdMethod(_) => DEST_ATTR_FWD_METHOD,
            Self::Weight(_) => DEST_ATTR_WEIGHT,
            Self::UpperThreshold(_) => DEST_ATTR_U_THRESH,
            Self::LowerThreshold(_) => DEST_ATTR_L_THRESH,
            Self::ActiveConns(_) => DEST_ATTR_ACTIVE_CONNS,
            Self::InactiveConns(_) => DEST_ATTR_INACT_CONNS,
            Self::PersistConns(_) => DEST_ATTR_PERSIST_CONNS,
            Self::AddressFamily(_) => DEST_ATTR_ADDR_FAMILY,
            Self::Other(a) => a.kind(),
        }
    }

    fn emit_value(&self, buffer: &mut [u8]) {
        match self {
            Self::Address(a) => buffer.copy_from_slice(a),
            Self::Port(p) => buffer[..2].copy_from_slice(&p.to_be_bytes()),
            Self::AddressFamily(v) => emit_u16(buffer, *v).unwrap(),
            Self::FwdMethod(v)
            | Self::Weight(v)
            | Self::UpperThreshold(v)
            | Self::LowerThreshold(v)
            | Self::ActiveConns(v)
            | Self::InactiveConns(v)
            | Self::PersistConns(v) => emit_u32(buffer, *v).unwrap(),
            Self::Other(a) => a.emit_value(buffer),
        }
    }
}

fn parse_inet_addr(value: &[u8]) -> Result<[u8; INET_ADDR_LEN], DecodeError> {
    // The kernel always sends the full union; shorter values (IPv4 only) are zero-extended, as
    // the kernel itself does with nla_memcpy when it parses ours.
    if value.len() > INET_ADDR_LEN || (value.len() != 4 && value.len() != INET_ADDR_LEN) {
        return Err(DecodeError::invalid_ip_address(value.len()));
    }
    let mut out = [0; INET_ADDR_LEN];
    out[..value.len()].copy_from_slice(value);
    Ok(out)
}

fn parse_port(value: &[u8]) -> Result<u16, DecodeError> {
    match value {
        [hi, lo, ..] => Ok(u16::from_be_bytes([*hi, *lo])),
        _ => Err(DecodeError::invalid_number(2, value.len())),
    }
}

fn parse_nested<T>(value: &[u8]) -> Result<Vec<T>, DecodeError>
where
    T: for<'a> Parseable<NlaBuffer<&'a [u8]>>,
{
    NlasIterator::new(value)
        .map(|nla| nla.and_then(|nla| T::parse(&nla)))
        .collect()
}

impl<'a, T: AsRef<[u8]> + ?Sized> Parseable<NlaBuffer<&'a T>> for IpvsAttr {
    fn parse(buf: &NlaBuffer<&'a T>) -> Result<Self, DecodeError> {
        let value = buf.value();
        Ok(match buf.kind() {
            CMD_ATTR_SERVICE => Self::Service(parse_nested(value)?),
            CMD_ATTR_DEST => Self::Dest(parse_nested(value)?),
            _ => Self::Other(DefaultNla::parse(buf)?),
        })
    }
}

impl<'a, T: AsRef<[u8]> + ?Sized> Parseable<NlaBuffer<&'a T>> for ServiceAttr {
    fn parse(buf: &NlaBuffer<&'a T>) -> Result<Self, DecodeError> {
        let v = buf.value();
        Ok(match buf.kind() {
            SVC_ATTR_AF => Self::AddressFamily(parse_u16(v)?),
            SVC_ATTR_PROTOCOL => Self::Protocol(parse_u16(v)?),
            SVC_ATTR_ADDR => Self::Address(parse_inet_addr(v)?),
            SVC_ATTR_PORT => Self::Port(parse_port(v)?),
            SVC_ATTR_FWMARK => Self::FwMark(parse_u32(v)?),
            SVC_ATTR_SCHED_NAME => Self::SchedName(parse_string(v)?),
            SVC_ATTR_FLAGS if v.len() >= 8 => Self::Flags {
                flags: parse_u32(&v[..4])?,
                mask: parse_u32(&v[4..8])?,
            },
            SVC_ATTR_TIMEOUT => Self::Timeout(parse_u32(v)?),
            SVC_ATTR_NETMASK => Self::Netmask(parse_u32(v)?),
            SVC_ATTR_PE_NAME => Self::PeName(parse_string(v)?),
            _ => Self::Other(DefaultNla::parse(buf)?),
        })
    }
}

impl<'a, T: AsRef<[u8]> + ?Sized> Parseable<NlaBuffer<&'a T>> for DestAttr {
    fn parse(buf: &NlaBuffer<&'a T>) -> Result<Self, DecodeError> {
        let v = buf.value();
        Ok(match buf.kind() {
            DEST_ATTR_ADDR => Self::Address(parse_inet_addr(v)?),
            DEST_ATTR_PORT => Self::Port(parse_port(v)?),
            DEST_ATTR_FWD_METHOD => Self::FwdMethod(parse_u32(v)?),
            DEST_ATTR_WEIGHT => Self::Weight(parse_u32(v)?),
            DEST_ATTR_U_THRESH => Self::UpperThreshold(parse_u32(v)?),
            DEST_ATTR_L_THRESH => Self::LowerThreshold(parse_u32(v)?),
            DEST_ATTR_ACTIVE_CONNS => Self::ActiveConns(parse_u32(v)?),
            DEST_ATTR_INACT_CONNS => Self::InactiveConns(parse_u32(v)?),
            DEST_ATTR_PERSIST_CONNS => Self::PersistConns(parse_u32(v)?),
            DEST_ATTR_ADDR_FAMILY => Self::AddressFamily(parse_u16(v)?),
            _ => Self::Other(DefaultNla::parse(buf)?),
        })
    }
}

/// One message of the IPVS family: a command and its attributes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpvsMessage {
    pub cmd: IpvsCmd,
    pub attrs: Vec<IpvsAttr>,
}

impl GenlFamily for IpvsMessage {
    fn family_name() -> &'static str {
        FAMILY_NAME
    }

    fn command(&self) -> u8 {
        self.cmd.into()
    }

    fn version(&self) -> u8 {
        FAMILY_VERSION
    }
}

impl Emitable for IpvsMessage {
    fn buffer_len(&self) -> usize {
        self.attrs.as_slice().buffer_len()
    }

    fn emit(&self, buffer: &mut [u8]) {
        self.attrs.as_slice().emit(buffer)
    }
}

impl ParseableParametrized<[u8], GenlHeader> for IpvsMessage {
    fn parse_with_param(buf: &[u8], header: GenlHeader) -> Result<Self, DecodeError> {
        Ok(Self {
            cmd: header.cmd.into(),
            attrs: parse_nested(buf)?,
        })
    }
}

/// The attributes naming a service: family, protocol, address, port.
fn service_id(key: &FrontendKey) -> Vec<ServiceAttr> {
    vec![
        ServiceAttr::AddressFamily(address_family(key.addr)),
        ServiceAttr::Protocol(key.protocol.number().into()),
        ServiceAttr::Address(inet_addr(key.addr)),
        ServiceAttr::Port(key.port),
    ]
}

/// A virtual service as IPVS holds it (only address:port:protocol services; firewall-mark
/// services are never xlb's).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VirtualService {
    pub key: FrontendKey,
    pub sched_name: String,
    /// Without [`SVC_F_HASHED`], which the kernel adds to every service it holds.
    pub flags: u32,
    /// Persistence timeout, seconds.
    pub timeout_s: u32,
    pub netmask: u32,
    /// Persistence engine (e.g. `sip`); xlb never sets one.
    pub pe_name: Option<String>,
}

impl VirtualService {
    fn attrs(&self) -> Vec<ServiceAttr> {
        let mut attrs = service_id(&self.key);
        attrs.extend([
            ServiceAttr::SchedName(self.sched_name.clone()),
            // Mask all: the service gets exactly these flags, whatever it had.
            ServiceAttr::Flags {
                flags: self.flags,
                mask: u32::MAX,
            },
            ServiceAttr::Timeout(self.timeout_s),
            ServiceAttr::Netmask(self.netmask),
        ]);
        if let Some(pe) = &self.pe_name {
            attrs.push(ServiceAttr::PeName(pe.clone()));
        }
        attrs
    }

    /// Reads a service from a GET_SERVICE reply. `Ok(None)`: a service xlb cannot own (firewall
    /// mark, or a protocol outside TCP/UDP/SCTP).
    pub fn from_reply(message: &IpvsMessage) -> anyhow::Result<Option<Self>> {
        let attrs = message
            .attrs
            .iter()
            .find_map(|a| match a {
                IpvsAttr::Service(s) => Some(s),
                _ => None,
            })
            .ok_or_else(|| anyhow!("IPVS service reply without a service attribute"))?;
        let (mut af, mut protocol, mut addr, mut port) = (None, None, None, None);
        let mut fwmark = 0;
        let mut svc = Self {
            key: FrontendKey {
                addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                port: 0,
                protocol: Protocol::Tcp,
            },
            sched_name: String::new(),
            flags: 0,
            timeout_s: 0,
            netmask: 0,
            pe_name: None,
        };
        for attr in attrs {
            match attr {
                ServiceAttr::AddressFamily(v) => af = Some(*v),
                ServiceAttr::Protocol(v) => protocol = Some(*v),
                ServiceAttr::Address(v) => addr = Some(*v),
                ServiceAttr::Port(v) => port = Some(*v),
                ServiceAttr::FwMark(v) => fwmark = *v,
                ServiceAttr::SchedName(v) => svc.sched_name = v.clone(),
                ServiceAttr::Flags { flags, .. } => svc.flags = flags & !SVC_F_HASHED,
                ServiceAttr::Timeout(v) => svc.timeout_s = *v,
                ServiceAttr::Netmask(v) => svc.netmask = *v,
                ServiceAttr::PeName(v) => svc.pe_name = Some(v.clone()).filter(|s| !s.is_empty()),
                ServiceAttr::Other(_) => {}
            }
        }
        if fwmark != 0 {
            return Ok(None);
        }
        let af = af.context("IPVS service reply without an address family")?;
        let Some(protocol) = protocol
            .and_then(|p| u8::try_from(p).ok())
            .and_then(Protocol::from_number)
        else {
            return Ok(None);
        };
        let addr = addr.context("IPVS service reply without an address")?;
        svc.key = FrontendKey {
            addr: ip_from_inet(af, &addr)?,
            port: port.context("IPVS service reply without a port")?,
            protocol,
        };
        Ok(Some(svc))
    }
}

/// A destination (real server) of a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct RealServer {
    pub addr: IpAddr,
    pub port: u16,
    /// `IP_VS_CONN_F_*` forwarding method.
    pub fwd_method: u32,
    pub weight: u32,
    pub upper_threshold: u32,
    pub lower_threshold: u32,
}

impl RealServer {
    /// A masquerading destination without connection thresholds: what xlb writes.
    pub fn masq(addr: IpAddr, port: u16, weight: u32) -> Self {
        Self {
            addr,
            port,
            fwd_method: CONN_F_MASQ,
            weight,
            upper_threshold: 0,
            lower_threshold: 0,
        }
    }

    fn attrs(&self) -> Vec<DestAttr> {
        vec![
            DestAttr::AddressFamily(address_family(self.addr)),
            DestAttr::Address(inet_addr(self.addr)),
            DestAttr::Port(self.port),
            DestAttr::FwdMethod(self.fwd_method),
            DestAttr::Weight(self.weight),
            DestAttr::UpperThreshold(self.upper_threshold),
            DestAttr::LowerThreshold(self.lower_threshold),
        ]
    }

    /// Reads a destination from a GET_DEST reply; `service_af` is the family of its service
    /// (kernels before 4.? send no per-destination family).
    pub fn from_reply(message: &IpvsMessage, service_af: IpAddr) -> anyhow::Result<Self> {
        let attrs = message
            .attrs
            .iter()
            .find_map(|a| match a {
                IpvsAttr::Dest(d) => Some(d),
                _ => None,
            })
            .ok_or_else(|| anyhow!("IPVS destination reply without a destination attribute"))?;
        let mut af = address_family(service_af);
        let (mut addr, mut port) = (None, None);
        let mut dest = Self::masq(service_af, 0, 0);
        for attr in attrs {
            match attr {
                DestAttr::Address(v) => addr = Some(*v),
                DestAttr::Port(v) => port = Some(*v),
                DestAttr::FwdMethod(v) => dest.fwd_method = v & CONN_F_FWD_MASK,
                DestAttr::Weight(v) => dest.weight = *v,
                DestAttr::UpperThreshold(v) => dest.upper_threshold = *v,
                DestAttr::LowerThreshold(v) => dest.lower_threshold = *v,
                DestAttr::AddressFamily(v) => af = *v,
                _ => {}
            }
        }
        dest.addr = ip_from_inet(
            af,
            &addr.context("IPVS destination reply without an address")?,
        )?;
        dest.port = port.context("IPVS destination reply without a port")?;
        Ok(dest)
    }
}

impl IpvsMessage {
    fn new(cmd: IpvsCmd, attrs: Vec<IpvsAttr>) -> Self {
        Self { cmd, attrs }
    }

    /// IPVS_CMD_NEW_SERVICE with every attribute the kernel requires of a new service.
    pub fn new_service(svc: &VirtualService) -> Self {
        Self::new(IpvsCmd::NewService, vec![IpvsAttr::Service(svc.attrs())])
    }

    /// IPVS_CMD_SET_SERVICE: scheduler, flags, persistence.
    pub fn set_service(svc: &VirtualService) -> Self {
        Self::new(IpvsCmd::SetService, vec![IpvsAttr::Service(svc.attrs())])
    }

    /// IPVS_CMD_DEL_SERVICE (with all its destinations and connections).
    pub fn del_service(key: &FrontendKey) -> Self {
        Self::new(
            IpvsCmd::DelService,
            vec![IpvsAttr::Service(service_id(key))],
        )
    }

    /// IPVS_CMD_GET_SERVICE, sent as a dump: every service.
    pub fn get_services() -> Self {
        Self::new(IpvsCmd::GetService, vec![])
    }

    /// IPVS_CMD_NEW_DEST.
    pub fn new_dest(key: &FrontendKey, dest: &RealServer) -> Self {
        Self::new(
            IpvsCmd::NewDest,
            vec![
                IpvsAttr::Service(service_id(key)),
                IpvsAttr::Dest(dest.attrs()),
            ],
        )
    }

    /// IPVS_CMD_SET_DEST: weight, forwarding method, thresholds.
    pub fn set_dest(key: &FrontendKey, dest: &RealServer) -> Self {
        Self::new(
            IpvsCmd::SetDest,
            vec![
                IpvsAttr::Service(service_id(key)),
                IpvsAttr::Dest(dest.attrs()),
            ],
        )
    }

    /// IPVS_CMD_DEL_DEST.
    pub fn del_dest(key: &FrontendKey, addr: IpAddr, port: u16) -> Self {
        Self::new(
            IpvsCmd::DelDest,
            vec![
                IpvsAttr::Service(service_id(key)),
                IpvsAttr::Dest(vec![
                    DestAttr::AddressFamily(address_family(addr)),
                    DestAttr::Address(inet_addr(addr)),
                    DestAttr::Port(port),
                ]),
            ],
        )
    }

    /// IPVS_CMD_GET_DEST, sent as a dump: the destinations of one service.
    pub fn get_dests(key: &FrontendKey) -> Self {
        Self::new(IpvsCmd::GetDest, vec![IpvsAttr::Service(service_id(key))])
    }
}

#[cfg(test)]
mod tests {
    //! Every request pinned byte for byte. Expectations are written as attribute lists straight
    //! from ip_vs.h (type numbers, value layouts), through a tiny TLV writer of their own, so a
    //! mistake in the encoder cannot hide in the expectation.

    use netlink_packet_core::{NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST};
    use netlink_packet_generic::{
        GenlMessage,
        ctrl::{GenlCtrl, GenlCtrlCmd, nlas::GenlCtrlAttrs},
    };

    use super::*;
    use crate::dataplane::ipvs::netlink::encode;

    const FAMILY_ID: u16 = 0x23;
    const SEQ: u32 = 7;

    /// One attribute: length (header + value, unpadded), type, value, zero padding to 4.
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

    fn nest(kind: u16, children: &[Vec<u8>]) -> Vec<u8> {
        nla(kind, &children.concat())
    }

    fn u16_ne(v: u16) -> Vec<u8> {
        v.to_ne_bytes().to_vec()
    }

    fn u32_ne(v: u32) -> Vec<u8> {
        v.to_ne_bytes().to_vec()
    }

    /// nlmsghdr + genlmsghdr + attributes.
    fn message(msg_type: u16, flags: u16, cmd: u8, version: u8, attrs: &[Vec<u8>]) -> Vec<u8> {
        let body = attrs.concat();
        let mut out = Vec::new();
        out.extend_from_slice(&((16 + 4 + body.len()) as u32).to_ne_bytes());
        out.extend_from_slice(&msg_type.to_ne_bytes());
        out.extend_from_slice(&flags.to_ne_bytes());
        out.extend_from_slice(&SEQ.to_ne_bytes());
        out.extend_from_slice(&0u32.to_ne_bytes()); // port: the kernel fills it in
        out.extend_from_slice(&[cmd, version, 0, 0]);
        out.extend_from_slice(&body);
        out
    }

    fn ipvs_bytes(msg: IpvsMessage, flags: u16) -> Vec<u8> {
        let mut genl = GenlMessage::from_payload(msg);
        genl.set_resolved_family_id(FAMILY_ID);
        encode(genl, flags, SEQ)
    }

    const ACK: u16 = NLM_F_REQUEST | NLM_F_ACK;
    const DUMP: u16 = NLM_F_REQUEST | NLM_F_DUMP;

    fn web() -> FrontendKey {
        FrontendKey {
            addr: "10.96.0.10".parse().unwrap(),
            port: 80,
            protocol: Protocol::Tcp,
        }
    }

    /// IPVS_SVC_ATTR_{AF, PROTOCOL, ADDR, PORT} of 10.96.0.10:80/TCP.
    fn web_id() -> Vec<Vec<u8>> {
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&[10, 96, 0, 10]);
        vec![
            nla(1, &u16_ne(2)),  // AF_INET
            nla(2, &u16_ne(6)),  // IPPROTO_TCP
            nla(3, &addr),       // union nf_inet_addr
            nla(4, &[0x00, 80]), // __be16 port
        ]
    }

    fn persistent_wrr() -> VirtualService {
        VirtualService {
            key: web(),
            sched_name: "wrr".into(),
            flags: SVC_F_PERSISTENT,
            timeout_s: 300,
            netmask: u32::MAX,
            pe_name: None,
        }
    }

    fn full_service_attrs() -> Vec<u8> {
        let mut attrs = web_id();
        attrs.extend([
            nla(6, b"wrr\0"),                                   // SCHED_NAME
            nla(7, &[u32_ne(1), u32_ne(0xffff_ffff)].concat()), // FLAGS {flags, mask}
            nla(8, &u32_ne(300)),                               // TIMEOUT
            nla(9, &[0xff; 4]),                                 // NETMASK
        ]);
        nest(1, &attrs)
    }

    #[test]
    fn family_resolution_asks_nlctrl_for_ipvs() {
        let mut genl = GenlMessage::from_payload(GenlCtrl {
            cmd: GenlCtrlCmd::GetFamily,
            nlas: vec![GenlCtrlAttrs::FamilyName(FAMILY_NAME.into())],
        });
        genl.finalize();
        // GENL_ID_CTRL 0x10, CTRL_CMD_GETFAMILY 3 (version 2), CTRL_ATTR_FAMILY_NAME 2.
        assert_eq!(
            encode(genl, ACK, SEQ),
            message(0x10, ACK, 3, 2, &[nla(2, b"IPVS\0")])
        );
    }

    #[test]
    fn new_service_carries_every_attribute_the_kernel_requires() {
        assert_eq!(
            ipvs_bytes(IpvsMessage::new_service(&persistent_wrr()), ACK),
            message(FAMILY_ID, ACK, 1, 1, &[full_service_attrs()])
        );
    }

    #[test]
    fn set_service_has_the_same_attributes_under_its_own_command() {
        assert_eq!(
            ipvs_bytes(IpvsMessage::set_service(&persistent_wrr()), ACK),
            message(FAMILY_ID, ACK, 2, 1, &[full_service_attrs()])
        );
    }

    #[test]
    fn del_service_names_the_service_only() {
        assert_eq!(
            ipvs_bytes(IpvsMessage::del_service(&web()), ACK),
            message(FAMILY_ID, ACK, 3, 1, &[nest(1, &web_id())])
        );
    }

    #[test]
    fn get_services_is_a_bare_dump() {
        assert_eq!(
            ipvs_bytes(IpvsMessage::get_services(), DUMP),
            message(FAMILY_ID, DUMP, 4, 1, &[])
        );
    }

    fn dest_attrs(weight: u32) -> Vec<u8> {
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&[10, 10, 2, 11]);
        nest(
            2,
            &[
                nla(11, &u16_ne(2)),   // ADDR_FAMILY AF_INET
                nla(1, &addr),         // ADDR
                nla(2, &[0x1f, 0x90]), // PORT 8080, network order
                nla(3, &u32_ne(0)),    // FWD_METHOD IP_VS_CONN_F_MASQ
                nla(4, &u32_ne(weight)),
                nla(5, &u32_ne(0)), // U_THRESH
                nla(6, &u32_ne(0)), // L_THRESH
            ],
        )
    }

    #[test]
    fn new_dest_is_a_masquerading_real_server_of_a_named_service() {
        let dest = RealServer::masq("10.10.2.11".parse().unwrap(), 8080, 3);
        assert_eq!(
            ipvs_bytes(IpvsMessage::new_dest(&web(), &dest), ACK),
            message(FAMILY_ID, ACK, 5, 1, &[nest(1, &web_id()), dest_attrs(3)])
        );
    }

    #[test]
    fn set_dest_to_weight_zero_drains() {
        let dest = RealServer::masq("10.10.2.11".parse().unwrap(), 8080, 0);
        assert_eq!(
            ipvs_bytes(IpvsMessage::set_dest(&web(), &dest), ACK),
            message(FAMILY_ID, ACK, 6, 1, &[nest(1, &web_id()), dest_attrs(0)])
        );
    }

    #[test]
    fn del_dest_names_service_and_real_server() {
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&[10, 10, 2, 11]);
        let dest = nest(
            2,
            &[nla(11, &u16_ne(2)), nla(1, &addr), nla(2, &[0x1f, 0x90])],
        );
        assert_eq!(
            ipvs_bytes(
                IpvsMessage::del_dest(&web(), "10.10.2.11".parse().unwrap(), 8080),
                ACK
            ),
            message(FAMILY_ID, ACK, 7, 1, &[nest(1, &web_id()), dest])
        );
    }

    #[test]
    fn get_dests_is_a_dump_of_one_service() {
        assert_eq!(
            ipvs_bytes(IpvsMessage::get_dests(&web()), DUMP),
            message(FAMILY_ID, DUMP, 8, 1, &[nest(1, &web_id())])
        );
    }

    #[test]
    fn ipv6_udp_service_uses_af_inet6_and_a_prefix_length_netmask() {
        let key = FrontendKey {
            addr: "fd00::53".parse().unwrap(),
            port: 53,
            protocol: Protocol::Udp,
        };
        let svc = VirtualService {
            key,
            sched_name: "mh".into(),
            flags: 0,
            timeout_s: 0,
            netmask: full_netmask(key.addr),
            pe_name: None,
        };
        let addr: Ipv6Addr = "fd00::53".parse().unwrap();
        let attrs = nest(
            1,
            &[
                nla(1, &u16_ne(10)), // AF_INET6
                nla(2, &u16_ne(17)), // IPPROTO_UDP
                nla(3, &addr.octets()),
                nla(4, &[0, 53]),
                nla(6, b"mh\0"),
                nla(7, &[u32_ne(0), u32_ne(0xffff_ffff)].concat()),
                nla(8, &u32_ne(0)),
                nla(9, &u32_ne(128)),
            ],
        );
        assert_eq!(
            ipvs_bytes(IpvsMessage::new_service(&svc), ACK),
            message(FAMILY_ID, ACK, 1, 1, &[attrs])
        );
    }

    #[test]
    fn sctp_uses_ipproto_sctp() {
        let key = FrontendKey {
            protocol: Protocol::Sctp,
            ..web()
        };
        let bytes = ipvs_bytes(IpvsMessage::del_service(&key), ACK);
        let mut id = web_id();
        id[1] = nla(2, &u16_ne(132));
        assert_eq!(bytes, message(FAMILY_ID, ACK, 3, 1, &[nest(1, &id)]));
    }

    /// Replies as the kernel builds them (ip_vs_genl_fill_service / _fill_dest): flags carry
    /// HASHED and a full mask, stats are nested, unknown attributes are skipped.
    #[test]
    fn kernel_replies_parse_into_services_and_real_servers() {
        let mut svc_attrs = web_id();
        svc_attrs.extend([
            nla(6, b"wrr\0"),
            nla(7, &[u32_ne(0x3), u32_ne(0xffff_ffff)].concat()), // PERSISTENT | HASHED
            nla(8, &u32_ne(300)),
            nla(9, &[0xff; 4]),
            nest(10, &[nla(1, &u32_ne(5))]), // STATS { CONNS }
        ]);
        let body = nest(1, &svc_attrs);
        let msg = IpvsMessage::parse_with_param(
            &body,
            GenlHeader {
                cmd: CMD_NEW_SERVICE,
                version: 1,
            },
        )
        .unwrap();
        assert_eq!(msg.cmd, IpvsCmd::NewService);
        let svc = VirtualService::from_reply(&msg).unwrap().unwrap();
        assert_eq!(svc, persistent_wrr());

        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&[10, 10, 2, 11]);
        let dest_body = nest(
            2,
            &[
                nla(1, &addr),
                nla(2, &[0x1f, 0x90]),
                nla(3, &u32_ne(0)),
                nla(4, &u32_ne(0)),
                nla(14, &u32_ne(0)), // TUN_TYPE: unknown to us, skipped
                nla(5, &u32_ne(0)),
                nla(6, &u32_ne(0)),
                nla(7, &u32_ne(2)), // ACTIVE_CONNS
                nla(11, &u16_ne(2)),
            ],
        );
        let msg = IpvsMessage::parse_with_param(
            &dest_body,
            GenlHeader {
                cmd: CMD_NEW_DEST,
                version: 1,
            },
        )
        .unwrap();
        let dest = RealServer::from_reply(&msg, web().addr).unwrap();
        assert_eq!(
            dest,
            RealServer::masq("10.10.2.11".parse().unwrap(), 8080, 0)
        );
    }

    #[test]
    fn firewall_mark_and_unknown_protocol_services_are_not_ours() {
        let fwmark = nest(
            1,
            &[nla(1, &u16_ne(2)), nla(5, &u32_ne(42)), nla(6, b"rr\0")],
        );
        let msg = IpvsMessage::parse_with_param(
            &fwmark,
            GenlHeader {
                cmd: CMD_NEW_SERVICE,
                version: 1,
            },
        )
        .unwrap();
        assert_eq!(VirtualService::from_reply(&msg).unwrap(), None);

        let mut esp = web_id();
        esp[1] = nla(2, &u16_ne(50)); // IPPROTO_ESP
        let msg = IpvsMessage::parse_with_param(
            &nest(1, &esp),
            GenlHeader {
                cmd: CMD_NEW_SERVICE,
                version: 1,
            },
        )
        .unwrap();
        assert_eq!(VirtualService::from_reply(&msg).unwrap(), None);
    }
}
