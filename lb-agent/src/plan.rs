//! Turns the model into per-frontend dataplane entries and diffs them against what the dataplane
//! holds, producing the smallest list of operations. Pure.
//!
//! A dataplane knows frontends, not services: each (address, port, protocol) gets a
//! [`FrontendSpec`] with the backends that frontend may use (the traffic policy of its scope
//! applied). Ops are ordered so every intermediate state is valid: all upserts first (a frontend
//! that moves between services is rewritten in place), then removals.

use std::{collections::BTreeMap, fmt, net::IpAddr};

use crate::model::{Frontend, Model, Protocol, Scheduler};

/// Identity of a frontend in a dataplane.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FrontendKey {
    pub addr: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

impl From<&Frontend> for FrontendKey {
    fn from(f: &Frontend) -> Self {
        Self {
            addr: f.addr,
            port: f.port,
            protocol: f.protocol,
        }
    }
}

impl fmt::Display for FrontendKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            IpAddr::V4(a) => write!(f, "{a}:{}/{}", self.port, self.protocol),
            IpAddr::V6(a) => write!(f, "[{a}]:{}/{}", self.port, self.protocol),
        }
    }
}

/// A backend as a dataplane sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendSpec {
    pub addr: IpAddr,
    pub port: u16,
    pub weight: u32,
}

/// Everything a dataplane needs for one frontend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendSpec {
    /// Name of the service the frontend belongs to (for logs and inspection; not compared when
    /// diffing, since a dataplane cannot store it).
    pub service: String,
    pub scheduler: Scheduler,
    pub affinity_timeout_s: Option<u32>,
    /// Backends for new flows, sorted.
    pub backends: Vec<BackendSpec>,
    /// Terminating backends outside `backends`: no new flows, but open ones may finish, so a
    /// dataplane keeps their connection state (IPVS keeps them at weight 0). Sorted.
    pub draining: Vec<BackendSpec>,
    /// With no backend, drop new flows instead of refusing them (see
    /// [`crate::model::Service::drops_when_empty`]).
    pub drop_when_empty: bool,
}

impl FrontendSpec {
    /// Whether two specs program the same packet behaviour.
    pub fn same_dataplane_state(&self, other: &Self) -> bool {
        self.scheduler == other.scheduler
            && self.affinity_timeout_s == other.affinity_timeout_s
            && self.backends == other.backends
            && self.draining == other.draining
            && self.drop_when_empty == other.drop_when_empty
    }
}

/// The dataplane entries a model asks for.
pub fn desired(model: &Model) -> BTreeMap<FrontendKey, FrontendSpec> {
    let mut out = BTreeMap::new();
    for service in model.services.values() {
        for frontend in &service.frontends {
            let spec = |b: &crate::model::Backend, weight| BackendSpec {
                addr: b.addr,
                port: b.port,
                weight,
            };
            let mut backends: Vec<BackendSpec> = service
                .usable_backends(frontend.scope)
                .iter()
                .map(|b| spec(b, b.weight))
                .collect();
            backends.sort();
            let mut draining: Vec<BackendSpec> = service
                .draining_backends(frontend.scope)
                .iter()
                .map(|b| spec(b, 0))
                .collect();
            draining.sort();
            out.insert(
                FrontendKey::from(frontend),
                FrontendSpec {
                    service: service.name.clone(),
                    scheduler: service.scheduler,
                    affinity_timeout_s: service.affinity_timeout_s,
                    backends,
                    draining,
                    drop_when_empty: service.drops_when_empty(frontend.scope),
                },
            );
        }
    }
    out
}

/// One change to a dataplane.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Create the frontend, or replace its state (scheduler, affinity, backends).
    Upsert(FrontendKey, FrontendSpec),
    /// Remove the frontend and all its state.
    Remove(FrontendKey),
}

impl Op {
    pub fn key(&self) -> &FrontendKey {
        match self {
            Op::Upsert(k, _) | Op::Remove(k) => k,
        }
    }
}

/// The operations that turn `current` into `desired`: nothing for unchanged frontends.
pub fn diff(
    current: &BTreeMap<FrontendKey, FrontendSpec>,
    desired: &BTreeMap<FrontendKey, FrontendSpec>,
) -> Vec<Op> {
    let upserts = desired
        .iter()
        .filter(|&(k, spec)| {
            current
                .get(k)
                .is_none_or(|cur| !cur.same_dataplane_state(spec))
        })
        .map(|(k, spec)| Op::Upsert(*k, spec.clone()));
    let removals = current
        .keys()
        .filter(|k| !desired.contains_key(k))
        .map(|k| Op::Remove(*k));
    upserts.chain(removals).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Backend, Scope, Service};

    fn svc(name: &str, vip: [u8; 4], port: u16, backends: &[(u8, u32)]) -> Service {
        Service {
            name: name.into(),
            frontends: vec![Frontend {
                addr: IpAddr::from(vip),
                port,
                protocol: Protocol::Tcp,
                scope: Scope::Internal,
            }],
            scheduler: Scheduler::Maglev,
            affinity_timeout_s: None,
            internal_local: false,
            external_local: false,
            backends: backends
                .iter()
                .map(|&(last, w)| Backend::ready(IpAddr::from([10, 1, 0, last]), 80, w))
                .collect(),
        }
    }

    fn model(services: Vec<Service>) -> Model {
        Model {
            services: services.into_iter().map(|s| (s.name.clone(), s)).collect(),
            ..Model::default()
        }
    }

    #[test]
    fn unchanged_model_needs_no_ops() {
        let m = model(vec![svc("a", [10, 96, 0, 1], 80, &[(1, 1), (2, 1)])]);
        let d = desired(&m);
        assert!(diff(&d, &d).is_empty());
    }

    #[test]
    fn only_changed_frontends_are_written_and_removals_come_last() {
        let before = desired(&model(vec![
            svc("a", [10, 96, 0, 1], 80, &[(1, 1)]),
            svc("b", [10, 96, 0, 2], 80, &[(1, 1)]),
            svc("c", [10, 96, 0, 3], 80, &[(1, 1)]),
        ]));
        let after = desired(&model(vec![
            svc("a", [10, 96, 0, 1], 80, &[(1, 1)]),
            svc("b", [10, 96, 0, 2], 80, &[(1, 2)]),
            svc("d", [10, 96, 0, 4], 80, &[]),
        ]));
        let ops = diff(&before, &after);
        let keys: Vec<String> = ops
            .iter()
            .map(|op| match op {
                Op::Upsert(k, _) => format!("+{k}"),
                Op::Remove(k) => format!("-{k}"),
            })
            .collect();
        assert_eq!(
            keys,
            vec![
                "+10.96.0.2:80/TCP",
                "+10.96.0.4:80/TCP",
                "-10.96.0.3:80/TCP"
            ]
        );
    }

    #[test]
    fn a_rename_alone_changes_nothing_in_the_dataplane() {
        let before = desired(&model(vec![svc("a", [10, 96, 0, 1], 80, &[(1, 1)])]));
        let after = desired(&model(vec![svc("renamed", [10, 96, 0, 1], 80, &[(1, 1)])]));
        assert!(diff(&before, &after).is_empty());
    }

    #[test]
    fn terminating_backends_drain_instead_of_vanishing() {
        let mut s = svc("a", [10, 96, 0, 1], 80, &[(1, 1), (2, 1)]);
        s.backends[1].ready = false;
        s.backends[1].terminating = true;
        let d = desired(&model(vec![s]));
        let spec = d.values().next().unwrap();
        assert_eq!(spec.backends.len(), 1);
        assert_eq!(
            spec.draining,
            vec![BackendSpec {
                addr: IpAddr::from([10, 1, 0, 2]),
                port: 80,
                weight: 0
            }]
        );
    }
}
