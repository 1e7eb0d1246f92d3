//! `cargo xtask demo`: loads xlb on a throwaway veth pair inside a network namespace, programs
//! the example services file, and shows the services map as bpftool reads it (field names from
//! BTF). Everything it creates is removed on exit, also on failure or Ctrl-C.

use std::path::Path;

use anyhow::Context as _;
use xlb_tests::{
    agent::{Agent, BpfFs},
    netns::{Netns, sh},
};

fn main() -> anyhow::Result<()> {
    xlb_tests::netns::require_privileges();
    // Ctrl-C: remove everything this process created, then exit.
    ctrlc::set_handler(|| {
        eprintln!("demo: interrupted, cleaning up");
        xlb_tests::netns::remove_leftovers();
        std::process::exit(130);
    })?;
    let services = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/services.yaml");
    let services = services
        .canonicalize()
        .context("deploy/examples/services.yaml")?;

    let ns = Netns::new("demo")?;
    ns.ip(&[
        "link",
        "add",
        "xlb-demo0",
        "type",
        "veth",
        "peer",
        "name",
        "xlb-demo1",
    ])?;
    ns.ip(&["link", "set", "xlb-demo0", "up"])?;
    ns.ip(&["link", "set", "xlb-demo1", "up"])?;
    let bpffs = BpfFs::new("demo")?;
    let pin_dir = bpffs.pin_dir();
    println!(
        "demo: namespace {}, veth xlb-demo0, pins in {}",
        ns.name,
        pin_dir.display()
    );

    let mut agent = Agent::start(
        &ns,
        &[
            "run",
            "--services",
            services.to_str().unwrap(),
            "--iface",
            "xlb-demo0",
            "--pin-dir",
            pin_dir.to_str().unwrap(),
        ],
    )?;
    let line = agent.wait_for_sync(1)?;
    println!("demo: agent says: {line}");
    println!(
        "demo: ip link show xlb-demo0\n{}",
        ns.ip(&["link", "show", "xlb-demo0"])?
    );
    let map = pin_dir.join(lb_common::maps::SERVICES);
    println!("demo: bpftool map dump pinned {}", map.display());
    println!(
        "{}",
        sh(&["bpftool", "map", "dump", "pinned", map.to_str().unwrap()])?
    );
    agent.stop()?;
    println!("demo: done; namespace and pins removed");
    Ok(())
}
