//! Picks the dataplane at start: `--dataplane xdp|ipvs` takes that one or fails, `auto` probes
//! XDP (BPF syscall usable, program loads, attaches on every `--iface`) and falls back to IPVS.
//! The choice comes with the reason, which the agent logs (kube-proxy's "Using ipvs Proxier").

use anyhow::anyhow;
use tracing::{info, warn};

use super::{
    Dataplane,
    ipvs::{IpvsDataplane, IpvsOptions},
    xdp::{AttachMode, LayoutMismatch, LoadOptions, XdpDataplane},
};

/// `--dataplane`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DataplaneMode {
    /// XDP where it loads and attaches, IPVS otherwise.
    Auto,
    /// XDP only.
    Xdp,
    /// Kernel IPVS over netlink only.
    Ipvs,
}

/// What the XDP dataplane needs to load and attach.
#[derive(Clone, Debug)]
pub struct XdpRequest {
    pub load: LoadOptions,
    pub ifaces: Vec<String>,
    pub mode: AttachMode,
}

/// The dataplane in use.
pub enum Chosen {
    // Boxed: the XDP dataplane is large and there is exactly one of these per agent.
    Xdp(Box<XdpDataplane>),
    Ipvs(IpvsDataplane),
}

impl Chosen {
    pub fn as_dyn(&mut self) -> &mut dyn Dataplane {
        match self {
            Self::Xdp(d) => d.as_mut(),
            Self::Ipvs(d) => d,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Self::Xdp(d) => d.kind(),
            Self::Ipvs(d) => d.kind(),
        }
    }
}

/// The chosen dataplane and why.
pub struct Choice {
    pub dataplane: Chosen,
    pub reason: String,
}

impl Choice {
    /// Logs the choice, its reason and the default scheduler of services that do not name one
    /// (`Using xdp dataplane dataplane=xdp reason="..." scheduler=mh`, one line operators and tests
    /// look for, like kube-proxy's "Using ipvs Proxier").
    pub fn log(&self, default_scheduler: &str) {
        let kind = self.dataplane.kind();
        info!(dataplane = %kind, reason = ?self.reason, scheduler = %default_scheduler, "Using {kind} dataplane");
    }
}

fn open_xdp(req: &XdpRequest) -> anyhow::Result<XdpDataplane> {
    if req.ifaces.is_empty() {
        return Err(anyhow!(
            "XDP needs interfaces to attach to and no --iface was given"
        ));
    }
    let mut dataplane = XdpDataplane::load(&req.load)?;
    if let Err(e) = dataplane.attach(&req.ifaces, req.mode) {
        // Undo the interfaces that did attach: a fallback to IPVS must not leave XDP running.
        dataplane.detach();
        return Err(e);
    }
    Ok(dataplane)
}

/// The first line of an error chain, cut before any verifier log, at most [`GIST_MAX`] chars.
fn gist(error: &anyhow::Error) -> String {
    let full = format!("{error:#}");
    let line = full.lines().next().unwrap_or_default();
    let line = line
        .split_once(" Verifier output:")
        .map_or(line, |(head, _)| head);
    match line.char_indices().nth(GIST_MAX) {
        Some((cut, _)) => format!("{}...", &line[..cut]),
        None => line.to_owned(),
    }
}

const GIST_MAX: usize = 200;

/// Opens the dataplane `mode` asks for. `auto` fails only when neither works, with both reasons.
pub fn choose(mode: DataplaneMode, xdp: &XdpRequest, ipvs: &IpvsOptions) -> anyhow::Result<Choice> {
    match mode {
        DataplaneMode::Xdp => Ok(Choice {
            dataplane: Chosen::Xdp(Box::new(open_xdp(xdp)?)),
            reason: "--dataplane xdp".into(),
        }),
        DataplaneMode::Ipvs => Ok(Choice {
            dataplane: Chosen::Ipvs(IpvsDataplane::open(ipvs)?),
            reason: "--dataplane ipvs".into(),
        }),
        DataplaneMode::Auto => {
            let xdp_error = match open_xdp(xdp) {
                Ok(dataplane) => {
                    return Ok(Choice {
                        dataplane: Chosen::Xdp(Box::new(dataplane)),
                        reason: format!("XDP attached on {}", xdp.ifaces.join(",")),
                    });
                }
                Err(e) => e,
            };
            // XDP is running here already, with maps this agent cannot read: starting IPVS beside
            // it would run two load balancers. Refuse, and leave the running one alone.
            if xdp_error.downcast_ref::<LayoutMismatch>().is_some() {
                return Err(xdp_error);
            }
            match IpvsDataplane::open(ipvs) {
                Ok(dataplane) => {
                    // The whole story (a verifier log can run to pages) once, the gist in the
                    // choice line.
                    warn!("XDP cannot run here, falling back to IPVS: {xdp_error:#}");
                    Ok(Choice {
                        dataplane: Chosen::Ipvs(dataplane),
                        reason: gist(&xdp_error),
                    })
                }
                Err(ipvs_error) => Err(anyhow!(
                    "no dataplane can run on this node. XDP: {xdp_error:#}. IPVS: {ipvs_error:#}"
                )),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reason_is_the_gist_of_the_xdp_error() {
        let verifier = anyhow!(
            "the BPF_PROG_LOAD syscall returned Invalid argument (os error 22). Verifier output: \
             0: R1=ctx(off=0,imm=0)\n1: (bf) r6 = r1\nmath between pkt pointer and register"
        )
        .context("the kernel rejected the XDP program");
        assert_eq!(
            gist(&verifier),
            "the kernel rejected the XDP program: the BPF_PROG_LOAD syscall returned Invalid \
             argument (os error 22)."
        );
        let attach = anyhow!("unknown network interface eth9").context("XDP attach on eth9 failed");
        assert_eq!(
            gist(&attach),
            "XDP attach on eth9 failed: unknown network interface eth9"
        );
        let long = anyhow!("{}", "x".repeat(500));
        assert_eq!(gist(&long).len(), GIST_MAX + 3);
    }
}
