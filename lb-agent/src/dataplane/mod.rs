//! Dataplanes program frontends into the kernel. The sync loop drives one through this trait and
//! never knows which it is.

mod batch;
pub mod ipvs;
pub mod pinned;
pub mod select;
pub mod xdp;

use std::collections::BTreeMap;

use crate::plan::{FrontendKey, FrontendSpec, Op};

/// An operation that failed; the frontend keeps its previous state.
#[derive(Debug)]
pub struct OpError {
    pub key: FrontendKey,
    pub error: anyhow::Error,
}

pub trait Dataplane: Send {
    /// `xdp` or `ipvs`, for logs, status and metrics.
    fn kind(&self) -> &'static str;

    /// The frontends the dataplane holds: adopted from the kernel at start, then kept current by
    /// [`Dataplane::apply`].
    fn current(&self) -> &BTreeMap<FrontendKey, FrontendSpec>;

    /// Why this dataplane cannot program a frontend (for example a protocol it lacks), if so.
    fn unsupported(&self, key: &FrontendKey) -> Option<String>;

    /// Applies `ops` in order. An op that fails is reported and leaves its frontend as it was;
    /// the others still apply.
    fn apply(&mut self, ops: Vec<Op>) -> Vec<OpError>;

    /// Re-reads what the kernel holds into [`Dataplane::current`], so the next diff repairs any
    /// drift (entries changed or removed behind the agent's back).
    fn refresh(&mut self) -> anyhow::Result<()>;

    /// Periodic housekeeping between syncs (expiring connection state, recounting flows).
    fn maintain(&mut self) -> anyhow::Result<()> {
        Ok(())
    }
}
