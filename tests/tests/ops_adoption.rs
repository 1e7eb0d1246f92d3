//! Adoption keeps draining backends: a frontend with a terminating endpoint reads back from the
//! maps exactly as it was written, on a periodic resync (refresh) and in a new agent on the same
//! pins, so neither rewrites its table. Before the xlb_draining record, every resync came back
//! without the draining backend and wrote a new table each syncPeriod.

use std::net::IpAddr;

use lb_agent::{
    dataplane::{
        Dataplane as _,
        pinned::PinnedMaps,
        xdp::{LoadOptions, XdpDataplane},
    },
    model::{Model, Protocol},
    plan::{BackendSpec, FrontendKey},
    source::file,
    sync::Syncer,
};
use xlb_tests::{
    agent::BpfFs,
    netns::{isolate_thread, require_privileges},
};

const TERMINATING: &str = "
services:
  - name: web
    vip: 10.96.0.10
    port: 80
    backends:
      - {ip: 10.10.2.11, port: 8080}
      - {ip: 10.10.2.12, port: 8080}
      - {ip: 10.10.2.13, port: 8080, terminating: true}
";

const GONE: &str = "
services:
  - name: web
    vip: 10.96.0.10
    port: 80
    backends:
      - {ip: 10.10.2.11, port: 8080}
      - {ip: 10.10.2.12, port: 8080}
";

fn model(yaml: &str) -> Model {
    let parsed = file::parse(yaml).unwrap();
    assert!(parsed.rejections.is_empty(), "{:?}", parsed.rejections);
    parsed.model
}

fn web() -> FrontendKey {
    FrontendKey {
        addr: "10.96.0.10".parse().unwrap(),
        port: 80,
        protocol: Protocol::Tcp,
    }
}

fn draining_backend() -> BackendSpec {
    BackendSpec {
        addr: IpAddr::from([10, 10, 2, 13]),
        port: 8080,
        weight: 0,
    }
}

#[test]
fn draining_backends_survive_resyncs_and_restarts() {
    require_privileges();
    isolate_thread().unwrap();
    let bpffs = BpfFs::new("adopt").unwrap();
    let opts = LoadOptions {
        pin_dir: Some(bpffs.pin_dir()),
        ..LoadOptions::default()
    };
    let terminating = model(TERMINATING);

    let mut dp = XdpDataplane::load(&opts).unwrap();
    let first = Syncer::new(&mut dp, "test").sync(&terminating, true);
    assert_eq!((first.ops, first.failed), (1, 0));
    let table = dp.maps.service_value(&web()).unwrap().table_id;
    assert_eq!(dp.current()[&web()].draining, vec![draining_backend()]);

    // A periodic resync re-reads the maps first.
    dp.refresh().unwrap();
    assert_eq!(dp.current()[&web()].draining, vec![draining_backend()]);
    assert_eq!(dp.current()[&web()].service, "web", "the name is kept");
    let resync = Syncer::new(&mut dp, "test").sync(&terminating, false);
    assert_eq!(resync.ops, 0, "a resync rewrites nothing");
    assert_eq!(dp.maps.service_value(&web()).unwrap().table_id, table);
    drop(dp);

    // A new agent on the same pins.
    let mut dp = XdpDataplane::load(&opts).unwrap();
    assert_eq!(dp.current()[&web()].draining, vec![draining_backend()]);
    let restart = Syncer::new(&mut dp, "test").sync(&terminating, true);
    assert_eq!(restart.ops, 0, "a restarted agent rewrites nothing");
    assert_eq!(dp.maps.service_value(&web()).unwrap().table_id, table);
    let pinned = PinnedMaps::open(&bpffs.pin_dir()).unwrap();
    let frontends = pinned.frontends().unwrap();
    let draining_id = dp
        .maps
        .backend_id(&web(), draining_backend().addr, 8080)
        .expect("the draining backend keeps its slot");
    assert_eq!(frontends[0].draining, vec![draining_id]);
    assert!(!frontends[0].table.contains_key(&draining_id));

    // The endpoint goes: its slot and its draining record go with it, and stay gone on the next
    // adoption.
    let gone = Syncer::new(&mut dp, "test").sync(&model(GONE), true);
    assert_eq!((gone.ops, gone.failed), (1, 0));
    assert!(
        dp.maps
            .backend_id(&web(), draining_backend().addr, 8080)
            .is_none()
    );
    assert!(pinned.frontends().unwrap()[0].draining.is_empty());
    assert_eq!(pinned.backends().unwrap().len(), 2);
    drop(dp);
    let mut dp = XdpDataplane::load(&opts).unwrap();
    assert!(dp.current()[&web()].draining.is_empty());
    assert_eq!(Syncer::new(&mut dp, "test").sync(&model(GONE), true).ops, 0);

    // And it can come back as draining (a terminating endpoint reappearing in a slice).
    let back = Syncer::new(&mut dp, "test").sync(&terminating, true);
    assert_eq!(back.ops, 1);
    dp.refresh().unwrap();
    assert_eq!(dp.current()[&web()].draining, vec![draining_backend()]);
}
