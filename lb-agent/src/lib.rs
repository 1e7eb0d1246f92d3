//! The xlb agent, as a library so tests and tools drive the same code the binary runs.
//!
//! The flow, one module per stage: [`source`] (services file, Kubernetes) -> [`model`] (pure
//! desired state) -> [`plan`] (diff into operations, with [`sched_table`] building scheduler
//! tables) -> [`dataplane`] (XDP or IPVS). [`sync`] drives the stages and reports each sync to
//! [`health`] (the listener: /healthz, /metrics, /status), [`metrics`] and [`status`].
//! [`service_health`] answers cloud load balancers' probes on health check node ports.
//! [`cli`] holds the operator commands besides `run`: inspect, status, preflight, cleanup.

pub mod cli;
pub mod dataplane;
pub mod health;
pub mod kube_proxy_config;
pub mod metrics;
pub mod model;
pub mod plan;
pub mod sched_table;
pub mod service_health;
pub mod source;
pub mod status;
pub mod sync;
