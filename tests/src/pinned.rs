//! Reads the agent's pinned maps the way the XDP program sees them: which frontends exist and
//! which backends each one's scheduler table can pick.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::Path,
};

use aya::maps::{Array, HashMap, Map, MapData};
use lb_common::{
    BACKEND_F_ACTIVE, BackendValue, SchedTable, ServiceKey, ServiceValue, maps, wire_addr_v4_octets,
};

/// An IPv4 frontend as (VIP, port, IP protocol number).
pub type FrontendV4 = (Ipv4Addr, u16, u8);
/// An IPv4 backend as (address, port).
pub type BackendV4 = (Ipv4Addr, u16);

fn open(pin_dir: &Path, name: &str) -> MapData {
    MapData::from_pin(pin_dir.join(name)).unwrap_or_else(|e| panic!("pinned map {name}: {e}"))
}

/// Every IPv4 frontend with the service value the program reads and the backends its scheduler
/// table holds (new flows go only to these).
pub fn frontends(pin_dir: &Path) -> BTreeMap<FrontendV4, (ServiceValue, BTreeSet<BackendV4>)> {
    let services: HashMap<MapData, ServiceKey, ServiceValue> =
        HashMap::try_from(Map::HashMap(open(pin_dir, maps::SERVICES))).unwrap();
    let tables: HashMap<MapData, u32, SchedTable> =
        HashMap::try_from(Map::HashMap(open(pin_dir, maps::SCHED_TABLES))).unwrap();
    let backends: Array<MapData, BackendValue> =
        Array::try_from(Map::Array(open(pin_dir, maps::BACKENDS))).unwrap();
    let mut out = BTreeMap::new();
    for entry in services.iter() {
        let (key, value) = entry.unwrap();
        let frontend = (
            Ipv4Addr::from(wire_addr_v4_octets(&key.addr)),
            u16::from_be(key.port),
            key.proto,
        );
        let mut picks = BTreeSet::new();
        if value.table_id != 0 {
            let table = tables.get(&value.table_id, 0).unwrap();
            for id in &table.backend_ids[..table.len as usize] {
                let b = backends.get(id, 0).unwrap();
                assert_ne!(
                    b.flags & BACKEND_F_ACTIVE,
                    0,
                    "table names a free backend slot"
                );
                picks.insert((
                    Ipv4Addr::from(wire_addr_v4_octets(&b.addr)),
                    u16::from_be(b.port),
                ));
            }
        }
        out.insert(frontend, (value, picks));
    }
    out
}

/// Frontends and the backends new flows may go to, without the service values.
pub fn routes(pin_dir: &Path) -> BTreeMap<FrontendV4, BTreeSet<BackendV4>> {
    frontends(pin_dir)
        .into_iter()
        .map(|(f, (_, b))| (f, b))
        .collect()
}

/// Every backend slot in use, including backends that only drain (no new flows, but their
/// connection state is kept).
pub fn active_backends(pin_dir: &Path) -> BTreeSet<BackendV4> {
    let backends: Array<MapData, BackendValue> =
        Array::try_from(Map::Array(open(pin_dir, maps::BACKENDS))).unwrap();
    backends
        .iter()
        .map(Result::unwrap)
        .filter(|b| b.flags & BACKEND_F_ACTIVE != 0)
        .map(|b| {
            (
                Ipv4Addr::from(wire_addr_v4_octets(&b.addr)),
                u16::from_be(b.port),
            )
        })
        .collect()
}
