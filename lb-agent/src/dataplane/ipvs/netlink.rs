//! A small synchronous netlink client: one request out, its replies (a single answer, an ACK or a
//! multi-part dump) back. Shared by the IPVS generic netlink family and rtnetlink (kube-ipvs0).
//!
//! Synchronous on purpose: the sync loop applies a batch of operations in one call and waits for
//! each kernel answer before the next write (a dest can only be added once its service exists),
//! so an async socket would buy nothing but a runtime dependency inside `Dataplane::apply`.

use std::{fmt::Debug, io, os::fd::AsRawFd as _, time::Duration};

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NLMSG_ALIGNTO, NetlinkDeserializable, NetlinkHeader,
    NetlinkMessage, NetlinkPayload, NetlinkSerializable,
};
use netlink_sys::{Socket, SocketAddr};

pub use netlink_sys::protocols::{NETLINK_GENERIC, NETLINK_ROUTE};

/// How long a request waits for each part of the kernel's answer.
const REPLY_TIMEOUT_S: u8 = 30;
const REPLY_TIMEOUT: Duration = Duration::from_secs(REPLY_TIMEOUT_S as u64);

/// What a request expects back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// A write or a single get: replies (if any) then an ACK (`NLM_F_ACK`).
    Ack,
    /// A dump (`NLM_F_DUMP`): replies until NLMSG_DONE.
    Dump,
}

/// An error the kernel answered with (NLMSG_ERROR with a non-zero code).
#[derive(Debug, thiserror::Error)]
#[error("{source}")]
pub struct KernelError {
    /// errno, positive.
    pub errno: i32,
    pub source: io::Error,
}

impl KernelError {
    fn new(errno: i32) -> Self {
        Self {
            errno,
            source: io::Error::from_raw_os_error(errno),
        }
    }
}

/// The errno of a kernel answer anywhere in an error chain, if the chain holds one.
pub fn errno_of(error: &anyhow::Error) -> Option<i32> {
    error
        .chain()
        .find_map(|e| e.downcast_ref::<KernelError>())
        .map(|e| e.errno)
}

/// Flags of a request expecting `expect`, with any extra `flags` (e.g. NLM_F_CREATE).
pub fn request_flags(expect: Expect, flags: u16) -> u16 {
    NLM_F_REQUEST
        | flags
        | match expect {
            Expect::Ack => NLM_F_ACK,
            Expect::Dump => NLM_F_DUMP,
        }
}

/// The bytes of one request: netlink header (length, type from the payload, flags, sequence
/// number, port 0 so the kernel fills in ours) and the payload.
pub fn encode<I>(payload: I, flags: u16, sequence_number: u32) -> Vec<u8>
where
    I: NetlinkSerializable + Debug,
{
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = sequence_number;
    let mut message = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(payload));
    message.finalize();
    let mut buf = vec![0; message.buffer_len()];
    message.serialize(&mut buf);
    buf
}

/// A netlink socket of one protocol (NETLINK_GENERIC, NETLINK_ROUTE) bound to the kernel.
pub struct NetlinkConn {
    socket: Socket,
    sequence: u32,
    protocol: &'static str,
}

impl NetlinkConn {
    pub fn open(protocol: isize, name: &'static str) -> io::Result<Self> {
        let mut socket = Socket::new(protocol)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        // Extended ACKs carry the kernel's text for EINVAL and friends; we only read the errno,
        // but asking costs nothing and helps strace readers.
        let _ = socket.set_ext_ack(true);
        // The kernel always answers; should it not, the sync fails instead of hanging forever.
        let timeout = libc::timeval {
            tv_sec: REPLY_TIMEOUT_S.into(),
            tv_usec: 0,
        };
        // SAFETY: a valid socket and a timeval of the size passed.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            socket,
            sequence: 0,
            protocol: name,
        })
    }

    /// Sends `payload` and collects the messages the kernel answers with, failing on an
    /// NLMSG_ERROR with a non-zero code (as a [`KernelError`]).
    pub fn request<I>(&mut self, payload: I, expect: Expect, flags: u16) -> anyhow::Result<Vec<I>>
    where
        I: NetlinkSerializable + NetlinkDeserializable + Debug,
    {
        self.sequence = self.sequence.wrapping_add(1);
        let sequence = self.sequence;
        let bytes = encode(payload, request_flags(expect, flags), sequence);
        self.socket.send(&bytes, 0)?;
        let mut replies = Vec::new();
        loop {
            let (datagram, _) = self.socket.recv_from_full().map_err(|e| {
                if e.kind() == io::ErrorKind::WouldBlock {
                    anyhow::anyhow!(
                        "the kernel did not answer a {} request within {REPLY_TIMEOUT:?}",
                        self.protocol
                    )
                } else {
                    e.into()
                }
            })?;
            let mut offset = 0;
            while offset < datagram.len() {
                let message =
                    NetlinkMessage::<I>::deserialize(&datagram[offset..]).map_err(|e| {
                        anyhow::anyhow!("malformed {} netlink reply: {e}", self.protocol)
                    })?;
                let length = message.header.length as usize;
                if length == 0 {
                    break;
                }
                let align = usize::from(NLMSG_ALIGNTO);
                offset += (length + align - 1) & !(align - 1);
                // Answers to an earlier request that gave up half-way are not ours.
                if message.header.sequence_number != sequence {
                    continue;
                }
                match message.payload {
                    NetlinkPayload::InnerMessage(inner) => replies.push(inner),
                    NetlinkPayload::Error(e) => match e.code {
                        Some(code) => return Err(KernelError::new(-code.get()).into()),
                        // An ACK: the answer to a write (or the end of a single get).
                        None => return Ok(replies),
                    },
                    NetlinkPayload::Done(_) => return Ok(replies),
                    NetlinkPayload::Overrun(_) => {
                        anyhow::bail!("{} netlink reply overran the socket buffer", self.protocol)
                    }
                    _ => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_flags_follow_netlink_h() {
        // NLM_F_REQUEST 0x1, NLM_F_ACK 0x4, NLM_F_ROOT|NLM_F_MATCH (dump) 0x300, NLM_F_CREATE 0x400.
        assert_eq!(request_flags(Expect::Ack, 0), 0x0005);
        assert_eq!(request_flags(Expect::Dump, 0), 0x0301);
        assert_eq!(request_flags(Expect::Ack, 0x400), 0x0405);
    }
}
