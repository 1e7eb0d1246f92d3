//! Packet tests: the real compiled XDP program, its maps programmed by the agent's own code, run
//! on frames built with etherparse through BPF_PROG_TEST_RUN.

use std::net::Ipv4Addr;

use aya::programs::{TestRun as _, TestRunOptions, TestRunResult, Xdp};
use etherparse::{PacketBuilder, TcpHeader};
use lb_agent::{
    dataplane::xdp::{LoadOptions, XdpDataplane},
    source::file,
    sync::Syncer,
};

use crate::netns::{isolate_thread, require_privileges, sh};

/// XDP return codes (uapi `enum xdp_action`).
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

/// MAC addresses of test frames.
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// Environment variable naming an lb-ebpf object for [`Harness`] to load instead of the one the
/// agent embeds.
pub const OBJECT_ENV: &str = "XLB_TEST_EBPF_OBJECT";

/// A loaded program with private (unpinned) maps, in a private network namespace.
pub struct Harness {
    pub dataplane: XdpDataplane,
}

/// What the program did with a frame.
#[derive(Debug)]
pub struct Outcome {
    pub action: u32,
    pub frame: Vec<u8>,
}

impl Default for Harness {
    fn default() -> Self {
        Self::new()
    }
}

impl Harness {
    /// Loads the program the agent embeds. The calling thread moves to an empty network namespace
    /// first, so FIB lookups find no route and results do not depend on the host.
    pub fn new() -> Self {
        Self::with_options(LoadOptions {
            pin_dir: None,
            ..LoadOptions::default()
        })
    }

    /// Loads with `opts`. Unless they name an object, `XLB_TEST_EBPF_OBJECT` (a path) picks
    /// one instead of the embedded object: the VM test runs these suites on the release object
    /// too.
    pub fn with_options(mut opts: LoadOptions) -> Self {
        require_privileges();
        isolate_thread().expect("private network namespace");
        if opts.object.is_none() {
            opts.object = std::env::var_os(OBJECT_ENV).map(Into::into);
        }
        let dataplane = XdpDataplane::load(&opts).expect("load the XDP program");
        Self { dataplane }
    }

    /// Programs the maps from a services file, through the agent's sync code.
    pub fn program(&mut self, services_yaml: &str) {
        let parsed = file::parse(services_yaml).expect("services file");
        assert!(parsed.rejections.is_empty(), "{:?}", parsed.rejections);
        self.program_model(&parsed.model);
    }

    /// Programs the maps from a model (for what a services file cannot express, such as
    /// Kubernetes traffic policies).
    pub fn program_model(&mut self, model: &lb_agent::model::Model) {
        let outcome = Syncer::new(&mut self.dataplane, "test").sync(model, true);
        assert_eq!(outcome.failed, 0, "sync failed");
    }

    /// Pins the calling thread to one CPU, so per-CPU scheduler state (round-robin cursors) is
    /// the same for every run.
    pub fn pin_to_cpu(&self, cpu: usize) {
        crate::netns::pin_thread_to_cpu(cpu);
    }

    /// Runs one frame through the program, as if received on loopback.
    pub fn run(&self, frame: &[u8]) -> Outcome {
        self.run_with_ctx(frame, None)
    }

    /// Runs one frame as if received on interface `ifindex` (of the calling thread's namespace),
    /// so the program's FIB lookup starts there.
    pub fn run_on(&self, frame: &[u8], ifindex: u32) -> Outcome {
        self.run_with_ctx(frame, Some(&xdp_ctx(frame, ifindex)))
    }

    fn run_with_ctx(&self, frame: &[u8], ctx: Option<&[u8]>) -> Outcome {
        // The kernel may grow the frame (headroom is separate); leave room for encapsulations.
        let mut out = vec![0u8; frame.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: ctx,
            ..Default::default()
        };
        let result = self
            .dataplane
            .program()
            .test_run(opts)
            .expect("BPF_PROG_TEST_RUN");
        out.truncate(result.data_size_out as usize);
        Outcome {
            action: result.return_value,
            frame: out,
        }
    }
}

/// The `struct xdp_md` of `frame` received on `ifindex`: { data, data_end, data_meta,
/// ingress_ifindex, rx_queue_index, egress_ifindex }. The kernel wants data_end == frame length
/// and the rest zero.
pub fn xdp_ctx(frame: &[u8], ifindex: u32) -> Vec<u8> {
    [0, frame.len() as u32, 0, ifindex, 0, 0]
        .iter()
        .flat_map(|v: &u32| v.to_ne_bytes())
        .collect()
}

/// Runs `program` on `frame` (received on `ifindex`) `repeat` times inside one
/// BPF_PROG_TEST_RUN call, without copying the frame back. The kernel runs the program on the
/// same buffer every time: a rewrite made by one run is what the next run sees.
pub fn run_repeated(program: &Xdp, frame: &[u8], ifindex: u32, repeat: u32) -> TestRunResult {
    let ctx = xdp_ctx(frame, ifindex);
    program
        .test_run(TestRunOptions {
            data_in: Some(frame),
            ctx_in: Some(&ctx),
            repeat,
            ..Default::default()
        })
        .expect("BPF_PROG_TEST_RUN")
}

/// A small router in the calling thread's namespace, shaped like the LB node of the end-to-end
/// topology, so the program's `bpf_fib_lookup` succeeds as it does on a real node: `lbc`
/// 10.10.1.1/24 towards the clients and `lbb` 10.10.2.1/24 towards the backends (veths whose
/// peers are up), forwarding on. Neighbours and routes are added by the caller.
pub struct Router {
    /// Interface index of `lbc`.
    pub client_side: u32,
    /// Interface index of `lbb`.
    pub backend_side: u32,
}

impl Router {
    /// Builds it in the calling thread's namespace (a [`Harness`] thread's private one).
    pub fn build() -> anyhow::Result<Self> {
        for (dev, peer) in [("lbc", "lbc-peer"), ("lbb", "lbb-peer")] {
            sh(&[
                "ip", "link", "add", dev, "type", "veth", "peer", "name", peer,
            ])?;
        }
        for dev in ["lo", "lbc", "lbc-peer", "lbb", "lbb-peer"] {
            sh(&["ip", "link", "set", dev, "up"])?;
        }
        sh(&["ip", "addr", "add", "10.10.1.1/24", "dev", "lbc"])?;
        sh(&["ip", "addr", "add", "10.10.2.1/24", "dev", "lbb"])?;
        sh(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        Ok(Self {
            client_side: Self::index_of("lbc")?,
            backend_side: Self::index_of("lbb")?,
        })
    }

    /// A permanent (resolved) neighbour entry.
    pub fn neighbour(&self, addr: Ipv4Addr, mac: &str, dev: &str) -> anyhow::Result<()> {
        let addr = addr.to_string();
        sh(&[
            "ip",
            "neigh",
            "replace",
            &addr,
            "lladdr",
            mac,
            "dev",
            dev,
            "nud",
            "permanent",
        ])
        .map(drop)
    }

    /// A route to `prefix` (e.g. `10.96.0.0/12`) through `via`.
    pub fn route(&self, prefix: &str, via: Ipv4Addr) -> anyhow::Result<()> {
        sh(&["ip", "route", "replace", prefix, "via", &via.to_string()]).map(drop)
    }

    /// Index of an interface of the calling thread's namespace. (/sys shows the namespace of
    /// whoever mounted it, not this thread's: ask iproute2.)
    pub fn index_of(dev: &str) -> anyhow::Result<u32> {
        let out = sh(&["ip", "-o", "link", "show", dev])?;
        Ok(out.split(':').next().unwrap_or_default().trim().parse()?)
    }

    /// MAC address of an interface of the calling thread's namespace.
    pub fn mac_of(dev: &str) -> anyhow::Result<[u8; 6]> {
        let out = sh(&["ip", "-o", "link", "show", dev])?;
        let mac = out
            .split("link/ether ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .ok_or_else(|| anyhow::anyhow!("{dev} has no MAC address: {out}"))?;
        let bytes = mac
            .split(':')
            .map(|x| u8::from_str_radix(x, 16))
            .collect::<Result<Vec<u8>, _>>()?;
        bytes
            .try_into()
            .map_err(|_| anyhow::anyhow!("bad MAC {mac}"))
    }
}

/// A TCP segment in an Ethernet frame. `flags` picks SYN/ACK/FIN/RST via the header setter.
pub fn tcp_frame(
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    configure: impl FnOnce(&mut TcpHeader),
    payload: &[u8],
) -> Vec<u8> {
    let mut tcp = TcpHeader::new(src.1, dst.1, 1000, 64240);
    configure(&mut tcp);
    let builder = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .ipv4(src.0.octets(), dst.0.octets(), 64)
        .tcp_header(tcp);
    let mut frame = Vec::with_capacity(builder.size(payload.len()));
    builder.write(&mut frame, payload).unwrap();
    frame
}

/// A TCP SYN.
pub fn syn(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Vec<u8> {
    tcp_frame(src, dst, |t| t.syn = true, &[])
}

/// A UDP datagram in an Ethernet frame.
pub fn udp_frame(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), payload: &[u8]) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .ipv4(src.0.octets(), dst.0.octets(), 64)
        .udp(src.1, dst.1);
    let mut frame = Vec::with_capacity(builder.size(payload.len()));
    builder.write(&mut frame, payload).unwrap();
    frame
}

/// The frame's headers as etherparse decodes them.
#[derive(Debug)]
pub struct Decoded {
    pub eth_src: [u8; 6],
    pub eth_dst: [u8; 6],
    pub ip: etherparse::Ipv4Header,
    pub transport: Option<etherparse::TransportHeader>,
    pub payload: Vec<u8>,
}

impl Decoded {
    pub fn src(&self) -> (Ipv4Addr, u16) {
        (Ipv4Addr::from(self.ip.source), self.ports().0)
    }

    pub fn dst(&self) -> (Ipv4Addr, u16) {
        (Ipv4Addr::from(self.ip.destination), self.ports().1)
    }

    fn ports(&self) -> (u16, u16) {
        match &self.transport {
            Some(etherparse::TransportHeader::Tcp(t)) => (t.source_port, t.destination_port),
            Some(etherparse::TransportHeader::Udp(u)) => (u.source_port, u.destination_port),
            _ => (0, 0),
        }
    }
}

/// Decodes an Ethernet/IPv4 frame and checks every checksum with etherparse's own computation
/// (not the program's incremental arithmetic), panicking on any mismatch.
pub fn decode_checked(frame: &[u8]) -> Decoded {
    let headers = etherparse::PacketHeaders::from_ethernet_slice(frame).expect("frame parses");
    let Some(etherparse::LinkHeader::Ethernet2(eth)) = headers.link else {
        panic!("no Ethernet header")
    };
    let Some(etherparse::NetHeaders::Ipv4(ip, _)) = headers.net else {
        panic!("no IPv4 header")
    };
    assert_eq!(
        ip.header_checksum,
        ip.calc_header_checksum(),
        "IPv4 header checksum"
    );
    let payload = headers.payload.slice().to_vec();
    match &headers.transport {
        Some(etherparse::TransportHeader::Tcp(tcp)) => {
            assert_eq!(
                tcp.checksum,
                tcp.calc_checksum_ipv4(&ip, &payload).unwrap(),
                "TCP checksum"
            );
        }
        Some(etherparse::TransportHeader::Icmpv4(icmp)) => {
            let want = etherparse::Icmpv4Header::with_checksum(icmp.icmp_type.clone(), &payload);
            assert_eq!(icmp.checksum, want.checksum, "ICMP checksum");
        }
        Some(etherparse::TransportHeader::Udp(udp)) if udp.checksum != 0 => {
            assert_eq!(
                udp.checksum,
                udp.calc_checksum_ipv4(&ip, &payload).unwrap(),
                "UDP checksum"
            );
        }
        _ => {}
    }
    Decoded {
        eth_src: eth.source,
        eth_dst: eth.destination,
        ip,
        transport: headers.transport,
        payload,
    }
}

/// The conntrack / flow-hash key of a packet as the program builds it.
pub fn flow_key(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), proto: u8) -> lb_common::FlowKey {
    lb_common::FlowKey {
        src_addr: lb_common::wire_addr_v4(src.0.octets()),
        dst_addr: lb_common::wire_addr_v4(dst.0.octets()),
        src_port: src.1.to_be(),
        dst_port: dst.1.to_be(),
        proto,
        family: lb_common::family::IPV4,
        _pad: 0,
    }
}

/// The oracle: which backend weighted Maglev gives a flow, computed from the agent's table
/// builder and lb-common's hash, independently of the program.
pub fn maglev_choice(
    backends: &[lb_agent::model::Backend],
    key: &lb_common::FlowKey,
) -> lb_agent::model::Backend {
    let table = lb_agent::sched_table::maglev(backends);
    let slot = lb_common::hash::maglev_slot(lb_common::hash::flow_hash(key));
    backends[table[slot as usize] as usize]
}
