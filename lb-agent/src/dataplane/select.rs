//! Picks the dataplane at start: `--dataplane xdp|ipvs` takes that one or fails, `auto` probes
//! XDP (BPF syscall usable, program loads, attaches on every `--iface`) and falls back to IPVS.
//! The choice comes with the reason, which the agent logs (kube-proxy's "Using ipvs Proxier").

use anyhow::anyhow;
use tracing::info;

use super::{
    Dataplane,
    ipvs::{IpvsDataplane, IpvsOptions},
    xdp::{AttachMode, LoadOptions, XdpDataplane},
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
    /// Logs the choice and its reason (`dataplane=ipvs reason="..."`, one line operators and
    /// tests look for) and hands over the dataplane.
    pub fn log(self) -> Chosen {
        let kind = self.dataplane.kind();
        info!(dataplane = %kind, reason = ?self.reason, "Using {kind} dataplane");
        self.dataplane
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
            match IpvsDataplane::open(ipvs) {
                Ok(dataplane) => Ok(Choice {
                    dataplane: Chosen::Ipvs(dataplane),
                    reason: format!("{xdp_error:#}"),
                }),
                Err(ipvs_error) => Err(anyhow!(
                    "no dataplane can run on this node. XDP: {xdp_error:#}. IPVS: {ipvs_error:#}"
                )),
            }
        }
    }
}
