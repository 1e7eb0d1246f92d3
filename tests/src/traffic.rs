//! Real TCP and UDP traffic for end-to-end tests and the demo. Backend servers answer every
//! request line (TCP) or datagram (UDP) with `<backend name> <client address as seen>`, so a test
//! learns both where its request went and which source address the backend saw.

use std::{
    io::{self, BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    time::Duration,
};

use crate::netns::Netns;

/// How long a client waits for an answer before calling it lost (a failure guard, not a
/// performance bound).
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// A backend's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The backend's name (`b1`, `b2`, ...).
    pub backend: String,
    /// The client address the backend saw.
    pub seen_client: SocketAddr,
}

fn parse_reply(line: &str) -> io::Result<Reply> {
    let mut parts = line.split_whitespace();
    let bad = || io::Error::new(io::ErrorKind::InvalidData, format!("bad reply {line:?}"));
    let backend = parts.next().ok_or_else(bad)?.to_owned();
    let seen_client = parts.next().ok_or_else(bad)?.parse().map_err(|_| bad())?;
    Ok(Reply {
        backend,
        seen_client,
    })
}

/// Starts a TCP and a UDP server named `name` on `addr` inside `ns`. They run until the process
/// exits, their threads pinned to `cpu` if given.
pub fn serve(
    ns: &Netns,
    name: &str,
    addr: Ipv4Addr,
    tcp_port: u16,
    udp_port: u16,
    cpu: Option<usize>,
) -> anyhow::Result<()> {
    let pin = move || {
        if let Some(cpu) = cpu {
            crate::netns::pin_thread_to_cpu(cpu);
        }
    };
    let (tcp_name, udp_name) = (name.to_owned(), name.to_owned());
    // Bind inside the namespace and report errors before returning.
    let tcp = ns.run(move || TcpListener::bind((addr, tcp_port)))??;
    let udp = ns.run(move || UdpSocket::bind((addr, udp_port)))??;
    std::thread::spawn(move || {
        pin();
        for stream in tcp.incoming().flatten() {
            let name = tcp_name.clone();
            std::thread::spawn(move || {
                pin();
                answer_tcp(&name, stream)
            });
        }
    });
    std::thread::spawn(move || {
        pin();
        let mut buf = [0u8; 2048];
        while let Ok((_, peer)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(format!("{udp_name} {peer}\n").as_bytes(), peer);
        }
    });
    Ok(())
}

/// Binds a UDP "discard" socket (RFC 863) on `addr:port` inside `ns` and returns it: it is never
/// read, so datagrams sent to it are dropped by the kernel once its receive buffer is full,
/// without an ICMP error going back. Floods are counted on the interface, not by this socket.
pub fn discard(ns: &Netns, addr: Ipv4Addr, port: u16) -> anyhow::Result<UdpSocket> {
    Ok(ns.run(move || UdpSocket::bind((addr, port)))??)
}

fn answer_tcp(name: &str, stream: TcpStream) {
    let Ok(peer) = stream.peer_addr() else { return };
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    for line in BufReader::new(stream).lines() {
        if line.is_err()
            || writer
                .write_all(format!("{name} {peer}\n").as_bytes())
                .is_err()
        {
            return;
        }
    }
}

/// A client TCP connection kept open across requests.
pub struct TcpClient {
    reader: BufReader<TcpStream>,
}

impl TcpClient {
    /// Connects (from the calling thread's namespace).
    pub fn connect(addr: SocketAddrV4) -> io::Result<Self> {
        let stream = TcpStream::connect_timeout(&addr.into(), ANSWER_TIMEOUT)?;
        stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
        stream.set_nodelay(true)?;
        Ok(Self {
            reader: BufReader::new(stream),
        })
    }

    /// Connects from a given local address (one of several on the interface).
    pub fn connect_from(local: Ipv4Addr, addr: SocketAddrV4) -> io::Result<Self> {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        socket.bind(&SocketAddrV4::new(local, 0).into())?;
        socket.connect_timeout(&addr.into(), ANSWER_TIMEOUT)?;
        let stream: TcpStream = socket.into();
        stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
        stream.set_nodelay(true)?;
        Ok(Self {
            reader: BufReader::new(stream),
        })
    }

    /// Sends one request line and reads the answer.
    pub fn ask(&mut self) -> io::Result<Reply> {
        self.reader.get_mut().write_all(b"hello\n")?;
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed",
            ));
        }
        parse_reply(&line)
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.reader.get_ref().local_addr()
    }
}

/// One request on a fresh connection.
pub fn tcp_once(addr: SocketAddrV4) -> io::Result<Reply> {
    TcpClient::connect(addr)?.ask()
}

/// One request on a connected UDP socket, which only accepts answers from `addr` itself (so a
/// reply that was not reverse-NATed to the VIP is never seen). Retried a few times since UDP may
/// lose the first datagram while the LB resolves its neighbours.
pub fn udp_once(addr: SocketAddrV4) -> io::Result<Reply> {
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    socket.connect(addr)?;
    udp_ask(&socket, 5)
}

/// One request on an already connected UDP socket, sent up to `attempts` times.
pub fn udp_ask(socket: &UdpSocket, attempts: u32) -> io::Result<Reply> {
    socket.set_read_timeout(Some(ANSWER_TIMEOUT / attempts.max(1)))?;
    let mut buf = [0u8; 2048];
    let mut last = io::Error::new(io::ErrorKind::TimedOut, "no answer");
    for _ in 0..attempts {
        socket.send(b"hello")?;
        match socket.recv(&mut buf) {
            Ok(n) => return parse_reply(&String::from_utf8_lossy(&buf[..n])),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Counts answers per backend.
pub fn tally<'a>(
    replies: impl IntoIterator<Item = &'a Reply>,
) -> std::collections::BTreeMap<String, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for r in replies {
        *counts.entry(r.backend.clone()).or_insert(0) += 1;
    }
    counts
}
