//! The load generator of the throughput stage: threads with real sockets in the client
//! namespace, each running one kind of traffic until a deadline. The same generator runs through
//! xlb and through the iptables baseline.

use std::{
    io,
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    os::fd::AsRawFd as _,
    time::{Duration, Instant},
};

use super::Rng;
use crate::{netns::Netns, traffic};

/// What one run of a generator did.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Counts {
    /// Completed operations (connections answered, requests answered, datagrams sent).
    pub ok: u64,
    /// Failed ones (refused, timed out, no answer).
    pub failed: u64,
    pub elapsed: Duration,
}

impl Counts {
    pub fn per_second(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// How long a UDP request waits for its answer before it counts as lost. Short, so a loss costs
/// the generator little time; long enough for a loaded two-core machine.
const UDP_ANSWER_TIMEOUT: Duration = Duration::from_millis(200);
/// Datagrams handed to the kernel per sendmmsg call in the flood.
const FLOOD_BATCH: usize = 64;

/// Runs `threads` copies of `work(thread index, deadline)` in `ns` and adds up their counts.
fn in_threads(
    ns: &Netns,
    threads: usize,
    duration: Duration,
    work: impl Fn(usize, Instant) -> (u64, u64) + Send + Sync + Clone + 'static,
) -> anyhow::Result<Counts> {
    let started = Instant::now();
    let deadline = started + duration;
    let handles = (0..threads)
        .map(|t| {
            let work = work.clone();
            ns.spawn(move || work(t, deadline))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut counts = Counts::default();
    for h in handles {
        let (ok, failed) = h
            .join()
            .map_err(|_| anyhow::anyhow!("generator thread panicked"))?;
        counts.ok += ok;
        counts.failed += failed;
    }
    counts.elapsed = started.elapsed();
    Ok(counts)
}

/// TCP connections per second: each connection to a random target sends one request line,
/// reads the answer and closes.
pub fn tcp_connections(
    ns: &Netns,
    targets: Vec<SocketAddrV4>,
    threads: usize,
    duration: Duration,
) -> anyhow::Result<Counts> {
    in_threads(ns, threads, duration, move |t, deadline| {
        let mut rng = Rng::new(0x7463_7000 + t as u64);
        let (mut ok, mut failed) = (0, 0);
        while Instant::now() < deadline {
            match traffic::tcp_once(targets[rng.below(targets.len())]) {
                Ok(_) => ok += 1,
                Err(_) => failed += 1,
            }
        }
        (ok, failed)
    })
}

/// One UDP request from a fresh socket (a new flow, as DNS clients make), answered or lost.
fn udp_request(target: SocketAddrV4) -> io::Result<()> {
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    socket.connect(target)?;
    socket.set_read_timeout(Some(UDP_ANSWER_TIMEOUT))?;
    socket.send(b"hello")?;
    let mut buf = [0u8; 256];
    let n = socket.recv(&mut buf)?;
    if n == 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "empty answer"));
    }
    Ok(())
}

/// UDP requests per second: each from a new socket to a random target, waiting for the answer.
pub fn udp_requests(
    ns: &Netns,
    targets: Vec<SocketAddrV4>,
    threads: usize,
    duration: Duration,
) -> anyhow::Result<Counts> {
    in_threads(ns, threads, duration, move |t, deadline| {
        let mut rng = Rng::new(0x7564_7000 + t as u64);
        let (mut ok, mut failed) = (0, 0);
        while Instant::now() < deadline {
            match udp_request(targets[rng.below(targets.len())]) {
                Ok(()) => ok += 1,
                Err(_) => failed += 1,
            }
        }
        (ok, failed)
    })
}

/// A UDP flood: every thread sends `payload`-byte datagrams to `target` from its own socket (its
/// own flow), in batches of [`FLOOD_BATCH`] per sendmmsg, as fast as the kernel takes them.
/// `ok` counts datagrams the kernel accepted; what arrives is counted at the backends.
pub fn udp_flood(
    ns: &Netns,
    target: SocketAddrV4,
    threads: usize,
    duration: Duration,
    payload: usize,
) -> anyhow::Result<Counts> {
    in_threads(ns, threads, duration, move |_, deadline| {
        let Ok(socket) = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)) else {
            return (0, 1);
        };
        if socket.connect(target).is_err() {
            return (0, 1);
        }
        let data = vec![0x78u8; payload];
        let mut iov = libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        };
        // SAFETY: mmsghdr is plain data; zero is "no name, no control".
        let mut msgs: Vec<libc::mmsghdr> = (0..FLOOD_BATCH)
            .map(|_| unsafe { std::mem::zeroed() })
            .collect();
        for m in &mut msgs {
            m.msg_hdr.msg_iov = &mut iov;
            m.msg_hdr.msg_iovlen = 1;
        }
        let (mut sent, mut failed) = (0u64, 0u64);
        while Instant::now() < deadline {
            // SAFETY: every header points at `iov`, which points at `data`; all outlive the call.
            let n = unsafe {
                libc::sendmmsg(socket.as_raw_fd(), msgs.as_mut_ptr(), FLOOD_BATCH as u32, 0)
            };
            if n > 0 {
                sent += n as u64;
            } else {
                failed += 1;
            }
        }
        (sent, failed)
    })
}
