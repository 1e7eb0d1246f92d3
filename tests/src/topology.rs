//! The end-to-end topology: a client, an LB node running the agent, and backends behind a
//! switch, each in its own network namespace, joined by veth pairs.
//!
//! ```text
//!  client                 lb (lb-agent, XDP on lbc and lbb)           switch (bridge)     backends
//!  c0 10.10.1.2/24 ---- lbc 10.10.1.1/24   lbb 10.10.2.1/24 ---- sl  br0  sb1 ---- b0 10.10.2.11/24
//!                                                                          sb2 ---- b0 10.10.2.12/24
//!                                                                          sb3 ---- b0 10.10.2.13/24
//! ```
//!
//! The client and the backends route everything through the LB node, so replies come back
//! through it and get reverse-NATed. Two veth specifics, set up here:
//! * XDP_REDIRECT and XDP_TX into a veth need the receiving peer to run NAPI. GRO alone turns it
//!   on for redirected frames but (seen on 6.18) XDP_TX frames from the LB side still vanish, so
//!   the LB's peers (c0, sl) get an XDP program of their own: xlb's program with empty maps,
//!   which passes everything.
//! * A local stack sending over veth leaves TCP/UDP checksums to "offload" (only the pseudo-header
//!   sum is in the packet); a frame that XDP rewrites and redirects would arrive with a bad
//!   checksum. The senders (client, backends) compute checksums in software, as frames from a real
//!   NIC always carry them.

use std::net::Ipv4Addr;

use anyhow::Context as _;

use lb_agent::dataplane::xdp::{AttachMode, LoadOptions, XdpDataplane};

use std::path::Path;

use crate::{agent::Agent, netns::Netns, traffic};

pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 10, 1, 2);
pub const LB_CLIENT_SIDE: Ipv4Addr = Ipv4Addr::new(10, 10, 1, 1);
pub const LB_BACKEND_SIDE: Ipv4Addr = Ipv4Addr::new(10, 10, 2, 1);
/// The VIP of the example services file.
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// The LB's interfaces, which the agent attaches to.
pub const LB_IFACES: &str = "lbc,lbb";
/// Ports the backend servers listen on.
pub const TCP_PORT: u16 = 8080;
pub const UDP_PORT: u16 = 5353;

/// Address of backend `i` (0-based): 10.10.2.11, .12, ...
pub fn backend_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 10, 2, 11 + i as u8)
}

pub struct Topology {
    pub client: Netns,
    pub lb: Netns,
    pub switch: Netns,
    pub backends: Vec<Netns>,
    /// Pass-through XDP programs on the LB's peers (see the module docs); detached on drop.
    peer_programs: Vec<XdpDataplane>,
}

/// Attaches xlb's program, with private empty maps, to `iface` in `ns`: with no service it
/// passes every frame, and its presence makes the veth run NAPI for frames the LB sends it.
fn attach_pass_program(ns: &Netns, iface: &str) -> anyhow::Result<XdpDataplane> {
    let iface = iface.to_owned();
    ns.run(move || {
        let mut program = XdpDataplane::load(&LoadOptions {
            pin_dir: None,
            ..LoadOptions::default()
        })?;
        program.attach(&[iface], AttachMode::Driver)?;
        Ok(program)
    })?
}

impl Topology {
    /// Builds the namespaces and links, and starts a TCP and a UDP server in every backend
    /// (named `b1`, `b2`, ...; see [`traffic`]).
    pub fn new(backends: usize) -> anyhow::Result<Self> {
        Self::build(backends, None)
    }

    /// As [`Topology::new`], with every backend server thread on CPU `cpu`: with the client
    /// pinned there too, every packet of a test meets the same per-CPU scheduler state.
    pub fn with_servers_on_cpu(backends: usize, cpu: usize) -> anyhow::Result<Self> {
        Self::build(backends, Some(cpu))
    }

    /// Starts lb-agent on the LB node, attached to both of its interfaces, pinning under
    /// `pin_dir`, with the source given by `source` (e.g. `["--services", path]`). Syncs
    /// coalesce over 100 ms so tests see changes quickly.
    pub fn start_agent(&self, source: &[&str], pin_dir: &Path) -> anyhow::Result<Agent> {
        let mut args = vec!["run"];
        args.extend_from_slice(source);
        let pin_dir = pin_dir.to_str().context("pin dir is not UTF-8")?;
        args.extend_from_slice(&[
            "--iface",
            LB_IFACES,
            "--pin-dir",
            pin_dir,
            "--min-sync-period",
            "100ms",
        ]);
        Agent::start(&self.lb, &args)
    }

    fn build(backends: usize, servers_cpu: Option<usize>) -> anyhow::Result<Self> {
        let mut t = Self {
            peer_programs: Vec::new(),
            client: Netns::new("client")?,
            lb: Netns::new("lb")?,
            switch: Netns::new("switch")?,
            backends: (0..backends)
                .map(|i| Netns::new(&format!("b{}", i + 1)))
                .collect::<Result<_, _>>()?,
        };
        t.wire().context("build the test topology")?;
        for (i, ns) in t.backends.iter().enumerate() {
            traffic::serve(
                ns,
                &format!("b{}", i + 1),
                backend_addr(i),
                TCP_PORT,
                UDP_PORT,
                servers_cpu,
            )?;
        }
        Ok(t)
    }

    fn wire(&mut self) -> anyhow::Result<()> {
        let (client, lb, switch) = (&self.client, &self.lb, &self.switch);
        client.ip(&[
            "link", "add", "c0", "type", "veth", "peer", "name", "lbc", "netns", &lb.name,
        ])?;
        switch.ip(&[
            "link", "add", "sl", "type", "veth", "peer", "name", "lbb", "netns", &lb.name,
        ])?;
        switch.ip(&["link", "add", "br0", "type", "bridge"])?;
        switch.ip(&["link", "set", "sl", "master", "br0"])?;

        client.ip(&["addr", "add", "10.10.1.2/24", "dev", "c0"])?;
        lb.ip(&["addr", "add", "10.10.1.1/24", "dev", "lbc"])?;
        lb.ip(&["addr", "add", "10.10.2.1/24", "dev", "lbb"])?;
        for (ns, dev) in [
            (client, "c0"),
            (lb, "lbc"),
            (lb, "lbb"),
            (switch, "sl"),
            (switch, "br0"),
        ] {
            ns.ip(&["link", "set", dev, "up"])?;
        }
        client.ip(&["route", "add", "default", "via", "10.10.1.1"])?;
        lb.sysctl("net.ipv4.ip_forward", "1")?;
        // Replies are reverse-NATed before the stack sees them, but the first packets of a flow
        // go through the stack's forwarding with a VIP nobody owns: no reverse-path filtering.
        lb.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
        lb.sysctl("net.ipv4.conf.default.rp_filter", "0")?;
        // XDP_REDIRECT/XDP_TX into a veth needs NAPI on the receiving peer.
        client.exec(&["ethtool", "-K", "c0", "tx", "off"])?;
        self.peer_programs.push(attach_pass_program(client, "c0")?);
        self.peer_programs.push(attach_pass_program(switch, "sl")?);

        for (i, ns) in self.backends.iter().enumerate() {
            let port = format!("sb{}", i + 1);
            switch.ip(&[
                "link", "add", &port, "type", "veth", "peer", "name", "b0", "netns", &ns.name,
            ])?;
            switch.ip(&["link", "set", &port, "master", "br0"])?;
            switch.ip(&["link", "set", &port, "up"])?;
            ns.ip(&[
                "addr",
                "add",
                &format!("{}/24", backend_addr(i)),
                "dev",
                "b0",
            ])?;
            ns.ip(&["link", "set", "b0", "up"])?;
            ns.exec(&["ethtool", "-K", "b0", "tx", "off"])?;
            ns.ip(&["route", "add", "default", "via", "10.10.2.1"])?;
        }
        Ok(())
    }
}
