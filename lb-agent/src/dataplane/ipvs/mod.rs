//! The IPVS dataplane: each frontend becomes an IPVS virtual service (scheduler mapped 1:1,
//! ClientIP affinity as persistence) with masquerading real servers, and its VIP is bound to the
//! dummy interface `kube-ipvs0`, as kube-proxy's IPVS mode does. Everything goes through netlink:
//! the "IPVS" generic netlink family ([`family`]) and rtnetlink ([`vip_iface`]).
//!
//! The kernel is the record. [`Dataplane::current`] is built from GET_SERVICE / GET_DEST dumps,
//! so a restarted agent adopts what is there and a sync writes only what differs; every write
//! compares against what the kernel last reported, down to single destinations.
//!
//! **Ownership.** A service is xlb's exactly when its VIP is an address on the VIP interface.
//! That mark lives in the kernel next to the services (both vanish together on reboot or with the
//! network namespace), needs no state file that a container restart could lose, and is what
//! kube-proxy uses too (`ip addr show kube-ipvs0` tells an operator what is xlb's). Services on any
//! other address, such as ones made by hand with ipvsadm, are never read into the model, changed
//! or deleted. The flip side, as with kube-proxy: a hand-made service on an address xlb bound to
//! kube-ipvs0 (a VIP of one of its frontends) is taken as xlb's and removed unless desired.
//!
//! Terminating backends stay as real servers of weight 0, so IPVS sends them no new connections
//! while their open ones finish.

pub mod family;
pub mod netlink;
pub mod vip_iface;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
};

use anyhow::{Context as _, bail};
use netlink_packet_generic::{
    GenlMessage,
    ctrl::{GenlCtrl, GenlCtrlCmd, nlas::GenlCtrlAttrs},
};
use tracing::{debug, info, warn};

use self::{
    family::{IpvsMessage, RealServer, SVC_F_PERSISTENT, VirtualService, full_netmask},
    netlink::{Expect, NETLINK_GENERIC, NetlinkConn, errno_of},
    vip_iface::VipInterface,
};
use super::{Dataplane, OpError};
use crate::{
    model::parse_scheduler,
    plan::{BackendSpec, FrontendKey, FrontendSpec, Op},
};

pub use vip_iface::DEFAULT_VIP_IFACE;

/// How to open the IPVS dataplane.
#[derive(Clone, Debug)]
pub struct IpvsOptions {
    /// Dummy interface holding the VIPs (and marking which services are xlb's).
    pub vip_iface: String,
}

impl Default for IpvsOptions {
    fn default() -> Self {
        Self {
            vip_iface: DEFAULT_VIP_IFACE.to_owned(),
        }
    }
}

/// The largest weight IPVS takes (`int weight`, negative values are refused).
const MAX_WEIGHT: u32 = i32::MAX as u32;

/// The generic netlink socket and the family id the kernel gave "IPVS".
struct IpvsSocket {
    conn: NetlinkConn,
    family_id: u16,
}

impl IpvsSocket {
    fn open() -> anyhow::Result<Self> {
        let mut conn = NetlinkConn::open(NETLINK_GENERIC, "generic netlink")
            .context("open generic netlink")?;
        let family_id = resolve_family(&mut conn)?;
        Ok(Self { conn, family_id })
    }

    fn request(&mut self, msg: IpvsMessage, expect: Expect) -> anyhow::Result<Vec<IpvsMessage>> {
        let mut genl = GenlMessage::from_payload(msg);
        genl.set_resolved_family_id(self.family_id);
        Ok(self
            .conn
            .request(genl, expect, 0)?
            .into_iter()
            .map(|m| m.payload)
            .collect())
    }

    fn write(&mut self, msg: IpvsMessage) -> anyhow::Result<()> {
        self.request(msg, Expect::Ack).map(drop)
    }

    fn services(&mut self) -> anyhow::Result<Vec<VirtualService>> {
        let mut out = Vec::new();
        for reply in self
            .request(IpvsMessage::get_services(), Expect::Dump)
            .context("dump IPVS services")?
        {
            if let Some(svc) = VirtualService::from_reply(&reply)? {
                out.push(svc);
            }
        }
        Ok(out)
    }

    fn dests(&mut self, key: &FrontendKey) -> anyhow::Result<Vec<RealServer>> {
        self.request(IpvsMessage::get_dests(key), Expect::Dump)
            .with_context(|| format!("dump the real servers of {key}"))?
            .iter()
            .map(|reply| RealServer::from_reply(reply, key.addr))
            .collect()
    }
}

/// Asks the generic netlink controller for the id of the "IPVS" family.
fn resolve_family(conn: &mut NetlinkConn) -> anyhow::Result<u16> {
    let mut msg = GenlMessage::from_payload(GenlCtrl {
        cmd: GenlCtrlCmd::GetFamily,
        nlas: vec![GenlCtrlAttrs::FamilyName(family::FAMILY_NAME.to_owned())],
    });
    msg.finalize();
    let replies = match conn.request(msg, Expect::Ack, 0) {
        Ok(r) => r,
        Err(e) if errno_of(&e) == Some(libc::ENOENT) => bail!(
            "the kernel has no IPVS: the \"IPVS\" generic netlink family does not exist \
             (CONFIG_IP_VS is not set, or the ip_vs module is not loaded: modprobe ip_vs)"
        ),
        Err(e) => return Err(e.context("look up the IPVS generic netlink family")),
    };
    replies
        .iter()
        .flat_map(|m| &m.payload.nlas)
        .find_map(|a| match a {
            GenlCtrlAttrs::FamilyId(id) => Some(*id),
            _ => None,
        })
        .context("the generic netlink controller answered without a family id for IPVS")
}

/// One of xlb's services as the kernel holds it.
#[derive(Clone, Debug)]
struct OwnedService {
    service: VirtualService,
    dests: BTreeMap<(IpAddr, u16), RealServer>,
}

/// What xlb writes for a frontend.
fn wanted_service(key: FrontendKey, spec: &FrontendSpec) -> VirtualService {
    VirtualService {
        key,
        sched_name: spec.scheduler.ipvs_name().to_owned(),
        flags: if spec.affinity_timeout_s.is_some() {
            SVC_F_PERSISTENT
        } else {
            0
        },
        timeout_s: spec.affinity_timeout_s.unwrap_or(0),
        netmask: full_netmask(key.addr),
        pe_name: None,
    }
}

fn wanted_dests(spec: &FrontendSpec) -> anyhow::Result<BTreeMap<(IpAddr, u16), RealServer>> {
    spec.backends
        .iter()
        .chain(&spec.draining)
        .map(|b| {
            if b.weight > MAX_WEIGHT {
                bail!(
                    "backend {} has weight {}, more than IPVS takes ({MAX_WEIGHT})",
                    SocketAddr::new(b.addr, b.port),
                    b.weight
                );
            }
            Ok(((b.addr, b.port), RealServer::masq(b.addr, b.port, b.weight)))
        })
        .collect()
}

/// The frontend a kernel service programs. A weight-0 real server is ambiguous (a ready backend
/// of weight 0, or a draining one): `hint`, what this agent wrote last, settles it when the kernel
/// still matches it; otherwise weight 0 reads as draining.
///
/// State that a [`FrontendSpec`] cannot express (a scheduler or forwarding method xlb never writes,
/// thresholds, a persistence engine, another netmask) is shown with affinity `Some(0)`, which no
/// desired spec has, so the next diff rewrites the service.
fn spec_from_kernel(owned: &OwnedService, hint: Option<&FrontendSpec>) -> FrontendSpec {
    let svc = &owned.service;
    let scheduler = parse_scheduler(&svc.sched_name);
    let persistent = svc.flags & SVC_F_PERSISTENT != 0;
    let expressible = scheduler.is_some()
        && svc.pe_name.is_none()
        && svc.flags & !SVC_F_PERSISTENT == 0
        && svc.netmask == full_netmask(svc.key.addr)
        && (!persistent || svc.timeout_s > 0)
        && owned
            .dests
            .values()
            .all(|d| *d == RealServer::masq(d.addr, d.port, d.weight) && d.weight <= MAX_WEIGHT);
    let scheduler = scheduler.unwrap_or_default();
    let affinity_timeout_s = if !expressible {
        Some(0)
    } else if persistent {
        Some(svc.timeout_s)
    } else {
        None
    };
    let all: Vec<BackendSpec> = owned
        .dests
        .values()
        .map(|d| BackendSpec {
            addr: d.addr,
            port: d.port,
            weight: d.weight,
        })
        .collect();
    if let Some(hint) = hint {
        let mut hinted: Vec<BackendSpec> = hint
            .backends
            .iter()
            .chain(&hint.draining)
            .copied()
            .collect();
        hinted.sort();
        if expressible
            && hinted == all
            && hint.scheduler == scheduler
            && hint.affinity_timeout_s == affinity_timeout_s
        {
            return hint.clone();
        }
    }
    let (backends, draining) = all.into_iter().partition(|b| b.weight > 0);
    FrontendSpec {
        service: hint.map(|h| h.service.clone()).unwrap_or_default(),
        scheduler,
        affinity_timeout_s,
        backends,
        draining,
        // IPVS has no notion of dropping vs refusing without destinations (kube-proxy adds
        // iptables rules for that); the kernel state is the same either way.
        drop_when_empty: hint.is_some_and(|h| h.drop_when_empty),
    }
}

/// The IPVS dataplane.
pub struct IpvsDataplane {
    ipvs: IpvsSocket,
    vip_iface_name: String,
    vips: VipInterface,
    /// Addresses on the VIP interface, as last read or written.
    bound: BTreeSet<IpAddr>,
    /// xlb's services as the kernel holds them.
    owned: BTreeMap<FrontendKey, OwnedService>,
    current: BTreeMap<FrontendKey, FrontendSpec>,
}

impl IpvsDataplane {
    /// Resolves the IPVS family, creates the VIP interface if needed, and adopts the services
    /// found on it.
    pub fn open(opts: &IpvsOptions) -> anyhow::Result<Self> {
        let ipvs = IpvsSocket::open()?;
        let vips = VipInterface::ensure(&opts.vip_iface)?;
        let mut dataplane = Self {
            ipvs,
            vip_iface_name: opts.vip_iface.clone(),
            vips,
            bound: BTreeSet::new(),
            owned: BTreeMap::new(),
            current: BTreeMap::new(),
        };
        dataplane.refresh()?;
        if !dataplane.owned.is_empty() {
            info!(
                services = dataplane.owned.len(),
                real_servers = dataplane
                    .owned
                    .values()
                    .map(|o| o.dests.len())
                    .sum::<usize>(),
                iface = %dataplane.vip_iface_name,
                "adopted the IPVS services whose VIPs are on the VIP interface"
            );
        }
        Ok(dataplane)
    }

    /// The name of the VIP interface.
    pub fn vip_iface(&self) -> &str {
        &self.vip_iface_name
    }

    /// Reads xlb's services (those on bound VIPs) and their real servers from the kernel.
    fn read_owned(&mut self) -> anyhow::Result<BTreeMap<FrontendKey, OwnedService>> {
        let mut owned = BTreeMap::new();
        for service in self.ipvs.services()? {
            if !self.bound.contains(&service.key.addr) {
                continue;
            }
            let key = service.key;
            let dests = self
                .ipvs
                .dests(&key)?
                .into_iter()
                .map(|d| ((d.addr, d.port), d))
                .collect();
            owned.insert(key, OwnedService { service, dests });
        }
        Ok(owned)
    }

    fn upsert(&mut self, key: FrontendKey, spec: FrontendSpec) -> anyhow::Result<()> {
        let want_service = wanted_service(key, &spec);
        let want_dests = wanted_dests(&spec)?;

        // The VIP first: from here on the service (new or found) is xlb's.
        if !self.bound.contains(&key.addr) {
            self.vips.add(key.addr)?;
            self.bound.insert(key.addr);
            debug!(vip = %key.addr, iface = %self.vip_iface_name, "ipvs write: bound VIP");
        }

        if !self.owned.contains_key(&key) {
            match self.ipvs.write(IpvsMessage::new_service(&want_service)) {
                Ok(()) => {
                    debug!(frontend = %key, scheduler = %want_service.sched_name,
                        persistence_s = want_service.timeout_s, "ipvs write: new service");
                    self.owned.insert(
                        key,
                        OwnedService {
                            service: want_service.clone(),
                            dests: BTreeMap::new(),
                        },
                    );
                }
                // It was there before its VIP was bound (made by hand, or left by an earlier
                // owner of the interface). Its VIP is xlb's now, so it is too.
                Err(e) if errno_of(&e) == Some(libc::EEXIST) => {
                    let service = self
                        .ipvs
                        .services()?
                        .into_iter()
                        .find(|s| s.key == key)
                        .context("IPVS reported the service as existing, then did not list it")?;
                    let dests = self
                        .ipvs
                        .dests(&key)?
                        .into_iter()
                        .map(|d| ((d.addr, d.port), d))
                        .collect();
                    warn!(frontend = %key, "took over an existing IPVS service on a VIP xlb now holds");
                    self.owned.insert(key, OwnedService { service, dests });
                }
                Err(e) => return Err(scheduler_hint(e, &want_service, "create the IPVS service")),
            }
        }
        let owned = self.owned.get_mut(&key).expect("inserted above");
        if owned.service != want_service {
            self.ipvs
                .write(IpvsMessage::set_service(&want_service))
                .map_err(|e| scheduler_hint(e, &want_service, "update the IPVS service"))?;
            debug!(frontend = %key, scheduler = %want_service.sched_name,
                persistence_s = want_service.timeout_s, "ipvs write: set service");
            owned.service = want_service;
        }

        // Real servers: add and update before deleting, so the service never runs empty in
        // between when it does not have to.
        for (id, want) in &want_dests {
            match owned.dests.get(id) {
                None => {
                    self.ipvs
                        .write(IpvsMessage::new_dest(&key, want))
                        .with_context(|| {
                            format!("add real server {}", SocketAddr::new(want.addr, want.port))
                        })?;
                    debug!(frontend = %key, real_server = %SocketAddr::new(want.addr, want.port),
                        weight = want.weight, "ipvs write: new dest");
                }
                Some(have) if have != want => {
                    self.ipvs
                        .write(IpvsMessage::set_dest(&key, want))
                        .with_context(|| {
                            format!(
                                "update real server {}",
                                SocketAddr::new(want.addr, want.port)
                            )
                        })?;
                    debug!(frontend = %key, real_server = %SocketAddr::new(want.addr, want.port),
                        weight = want.weight, "ipvs write: set dest");
                }
                Some(_) => continue,
            }
            owned.dests.insert(*id, *want);
        }
        let stale: Vec<(IpAddr, u16)> = owned
            .dests
            .keys()
            .filter(|id| !want_dests.contains_key(id))
            .copied()
            .collect();
        for (addr, port) in stale {
            match self.ipvs.write(IpvsMessage::del_dest(&key, addr, port)) {
                Ok(()) => {}
                Err(e) if errno_of(&e) == Some(libc::ENOENT) => {}
                Err(e) => {
                    return Err(e.context(format!(
                        "delete real server {}",
                        SocketAddr::new(addr, port)
                    )));
                }
            }
            debug!(frontend = %key, real_server = %SocketAddr::new(addr, port), "ipvs write: del dest");
            owned.dests.remove(&(addr, port));
        }
        self.current.insert(key, spec);
        Ok(())
    }

    fn remove(&mut self, key: FrontendKey) -> anyhow::Result<()> {
        if self.owned.contains_key(&key) {
            match self.ipvs.write(IpvsMessage::del_service(&key)) {
                Ok(()) => {}
                // Gone already (ESRCH is the kernel's "no such service").
                Err(e) if errno_of(&e) == Some(libc::ESRCH) => {}
                Err(e) => return Err(e.context("delete the IPVS service")),
            }
            debug!(frontend = %key, "ipvs write: del service");
            self.owned.remove(&key);
        }
        self.current.remove(&key);
        Ok(())
    }

    /// Unbinds VIPs that no service of xlb's uses any more (removed services, or addresses left
    /// behind by an agent that stopped between binding a VIP and creating its service).
    fn release_unused_vips(&mut self) -> anyhow::Result<()> {
        let used: BTreeSet<IpAddr> = self.owned.keys().map(|k| k.addr).collect();
        let unused: Vec<IpAddr> = self.bound.difference(&used).copied().collect();
        for addr in unused {
            self.vips.remove(addr)?;
            self.bound.remove(&addr);
            debug!(vip = %addr, iface = %self.vip_iface_name, "ipvs write: unbound VIP");
        }
        Ok(())
    }
}

/// Whether this kernel has IPVS: the "IPVS" generic netlink family resolves (the ip_vs module is
/// loaded or built in).
pub fn probe() -> anyhow::Result<()> {
    IpvsSocket::open().map(drop)
}

/// What [`cleanup`] removed.
#[derive(Debug, Default)]
pub struct IpvsCleanup {
    /// The kernel has IPVS at all.
    pub ipvs_present: bool,
    pub services_removed: Vec<FrontendKey>,
    pub vip_iface_removed: bool,
}

/// Removes everything the IPVS dataplane creates: xlb's services (those whose VIP is on
/// `vip_iface`, the ownership rule of this module) and the VIP interface itself. Services on
/// other addresses are left alone.
pub fn cleanup(vip_iface: &str) -> anyhow::Result<IpvsCleanup> {
    let mut done = IpvsCleanup::default();
    let Some(mut vips) = VipInterface::open_existing(vip_iface)? else {
        done.ipvs_present = probe().is_ok();
        return Ok(done);
    };
    let bound = vips.addresses()?;
    match IpvsSocket::open() {
        Ok(mut ipvs) => {
            done.ipvs_present = true;
            for service in ipvs.services()? {
                if !bound.contains(&service.key.addr) {
                    continue;
                }
                match ipvs.write(IpvsMessage::del_service(&service.key)) {
                    Ok(()) => {}
                    Err(e) if errno_of(&e) == Some(libc::ESRCH) => {}
                    Err(e) => return Err(e.context(format!("delete {}", service.key))),
                }
                done.services_removed.push(service.key);
            }
        }
        // No IPVS: no services can exist; the interface (and its addresses) still go.
        Err(e) => debug!("cleanup: no IPVS here: {e:#}"),
    }
    vips.delete()?;
    done.vip_iface_removed = true;
    Ok(done)
}

/// Adds the likely cause to a service write the kernel refused with ENOENT: IPVS answers that when
/// the scheduler's module (ip_vs_<name>) is missing.
fn scheduler_hint(e: anyhow::Error, svc: &VirtualService, what: &str) -> anyhow::Error {
    if errno_of(&e) == Some(libc::ENOENT) {
        e.context(format!(
            "{what}: the kernel has no IPVS scheduler {:?} (module ip_vs_{})",
            svc.sched_name, svc.sched_name
        ))
    } else {
        e.context(what.to_owned())
    }
}

impl Dataplane for IpvsDataplane {
    fn kind(&self) -> &'static str {
        "ipvs"
    }

    fn current(&self) -> &BTreeMap<FrontendKey, FrontendSpec> {
        &self.current
    }

    fn unsupported(&self, _key: &FrontendKey) -> Option<String> {
        None
    }

    fn apply(&mut self, ops: Vec<Op>) -> Vec<OpError> {
        let mut errors = Vec::new();
        for op in ops {
            let key = *op.key();
            let result = match op {
                Op::Upsert(key, spec) => self.upsert(key, spec),
                Op::Remove(key) => self.remove(key),
            };
            if let Err(error) = result {
                errors.push(OpError { key, error });
            }
        }
        if let Err(e) = self.release_unused_vips() {
            warn!("could not unbind unused VIPs: {e:#}");
        }
        // A failed op may have stopped half-way (IPVS has no transactions): read back what the
        // kernel holds so the next diff starts from the truth.
        if !errors.is_empty()
            && let Err(e) = self.refresh()
        {
            warn!("could not re-read IPVS after a failed sync: {e:#}");
        }
        errors
    }

    fn refresh(&mut self) -> anyhow::Result<()> {
        // Re-ensure the interface: someone may have deleted it, and with it every VIP.
        self.vips = VipInterface::ensure(&self.vip_iface_name)?;
        self.bound = self.vips.addresses()?;
        self.owned = self.read_owned()?;
        let previous = std::mem::take(&mut self.current);
        self.current = self
            .owned
            .iter()
            .map(|(key, owned)| (*key, spec_from_kernel(owned, previous.get(key))))
            .collect();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Protocol, Scheduler};

    fn key() -> FrontendKey {
        FrontendKey {
            addr: "10.96.0.10".parse().unwrap(),
            port: 80,
            protocol: Protocol::Tcp,
        }
    }

    fn b(last: u8, weight: u32) -> BackendSpec {
        BackendSpec {
            addr: IpAddr::from([10, 1, 0, last]),
            port: 8080,
            weight,
        }
    }

    fn spec(backends: Vec<BackendSpec>, draining: Vec<BackendSpec>) -> FrontendSpec {
        FrontendSpec {
            service: "web".into(),
            scheduler: Scheduler::WeightedRoundRobin,
            affinity_timeout_s: Some(300),
            backends,
            draining,
            drop_when_empty: false,
        }
    }

    fn written(spec: &FrontendSpec) -> OwnedService {
        OwnedService {
            service: wanted_service(key(), spec),
            dests: wanted_dests(spec).unwrap(),
        }
    }

    #[test]
    fn what_xlb_writes_reads_back_as_the_same_spec() {
        let s = spec(vec![b(1, 3), b(2, 1)], vec![b(3, 0)]);
        let kernel = written(&s);
        assert_eq!(kernel.service.sched_name, "wrr");
        assert_eq!(kernel.service.flags, SVC_F_PERSISTENT);
        assert_eq!(kernel.service.timeout_s, 300);
        // Without a hint (a restarted agent): weight 0 reads as draining; only the name is lost.
        let adopted = spec_from_kernel(&kernel, None);
        assert!(adopted.same_dataplane_state(&s), "{adopted:?}");
        assert_eq!(spec_from_kernel(&kernel, Some(&s)), s);
    }

    #[test]
    fn a_weight_zero_ready_backend_keeps_its_place_while_the_kernel_matches_the_hint() {
        let s = spec(vec![b(1, 0), b(2, 1)], vec![]);
        let kernel = written(&s);
        assert_eq!(spec_from_kernel(&kernel, Some(&s)), s);
        // Without the hint it reads as draining, which the next diff rewrites (no kernel change).
        let adopted = spec_from_kernel(&kernel, None);
        assert_eq!(adopted.draining, vec![b(1, 0)]);
    }

    #[test]
    fn state_xlb_never_writes_is_marked_for_rewrite() {
        let s = spec(vec![b(1, 1)], vec![]);
        let mut cases = Vec::new();
        let mut k = written(&s);
        k.service.sched_name = "dh".into();
        cases.push(("unknown scheduler", k));
        let mut k = written(&s);
        k.service.flags |= 0x0008; // a scheduler flag
        cases.push(("extra flag", k));
        let mut k = written(&s);
        k.service.netmask = 0x00ff_ffff;
        cases.push(("netmask", k));
        let mut k = written(&s);
        k.dests.values_mut().next().unwrap().fwd_method = 0x0003; // direct routing
        cases.push(("forwarding method", k));
        let mut k = written(&s);
        k.dests.values_mut().next().unwrap().upper_threshold = 10;
        cases.push(("threshold", k));
        for (what, kernel) in cases {
            let got = spec_from_kernel(&kernel, Some(&s));
            assert_eq!(got.affinity_timeout_s, Some(0), "{what}");
            assert!(!got.same_dataplane_state(&s), "{what}");
        }
    }

    #[test]
    fn weights_beyond_ipvs_range_are_refused_with_the_reason() {
        let s = spec(vec![b(1, u32::MAX)], vec![]);
        let e = wanted_dests(&s).unwrap_err().to_string();
        assert!(e.contains("more than IPVS takes"), "{e}");
    }
}
