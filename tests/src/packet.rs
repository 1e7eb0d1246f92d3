//! Packet tests: the real compiled XDP program, its maps programmed by the agent's own code, run
//! on frames built with etherparse through BPF_PROG_TEST_RUN.

use std::net::Ipv4Addr;

use aya::programs::{TestRun as _, TestRunOptions};
use etherparse::{PacketBuilder, TcpHeader};
use lb_agent::{
    dataplane::xdp::{LoadOptions, XdpDataplane},
    source::file,
    sync::Syncer,
};

use crate::netns::{isolate_thread, require_privileges};

/// XDP return codes (uapi `enum xdp_action`).
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

/// MAC addresses of test frames.
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

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

    pub fn with_options(opts: LoadOptions) -> Self {
        require_privileges();
        isolate_thread().expect("private network namespace");
        let dataplane = XdpDataplane::load(&opts).expect("load the XDP program");
        Self { dataplane }
    }

    /// Programs the maps from a services file, through the agent's sync code.
    pub fn program(&mut self, services_yaml: &str) {
        let parsed = file::parse(services_yaml).expect("services file");
        assert!(parsed.rejections.is_empty(), "{:?}", parsed.rejections);
        let outcome = Syncer::new(&mut self.dataplane, "test").sync(&parsed.model, true);
        assert_eq!(outcome.failed, 0, "sync failed");
    }

    /// Runs one frame through the program.
    pub fn run(&self, frame: &[u8]) -> Outcome {
        // The kernel may grow the frame (headroom is separate); leave room for encapsulations.
        let mut out = vec![0u8; frame.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
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
