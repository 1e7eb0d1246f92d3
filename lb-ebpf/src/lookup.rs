//! Stage 2: find the service a packet is addressed to.

use lb_common::{FlowKey, ServiceKey, ServiceValue};

use crate::maps::xlb_services;

/// The service whose frontend is the packet's destination (VIP, port, protocol), if any.
#[inline(always)]
pub fn service_for(key: &FlowKey) -> Option<&'static ServiceValue> {
    let svc_key = ServiceKey {
        addr: key.dst_addr,
        port: key.dst_port,
        proto: key.proto,
        family: key.family,
    };
    // SAFETY: service entries are only ever replaced whole by the agent; the program never
    // writes through this reference.
    unsafe { xlb_services.get(&svc_key) }
}
