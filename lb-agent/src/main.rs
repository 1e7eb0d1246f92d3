//! `lb-agent`: the xlb node agent.

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use lb_agent::{
    dataplane::{
        ipvs::{DEFAULT_VIP_IFACE, IpvsOptions},
        select::{self, Chosen, DataplaneMode, XdpRequest},
        xdp::{AttachMode, LoadOptions},
    },
    source::file,
    sync::{SyncPeriods, Syncer},
};
use lb_common::{CONFIG_F_ICMP_ECHO, Config, maps};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use tracing::{error, info};

#[derive(Parser)]
#[command(
    name = "lb-agent",
    version,
    about = "xlb: an eBPF/XDP service load balancer for Kubernetes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the dataplane, program it from the services file, and keep it in sync.
    Run(RunArgs),
}

/// What happens to the attached program when the agent exits on SIGINT/SIGTERM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum OnExit {
    /// Detach from the interfaces (maps stay pinned for the next agent).
    Detach,
    /// Leave the pinned program attached so traffic keeps flowing (rolling upgrades).
    Keep,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Services file (standalone mode). Re-read when it changes and on SIGHUP.
    #[arg(long, value_name = "FILE")]
    services: PathBuf,
    /// Which dataplane programs the services: `auto` uses XDP where the program loads and
    /// attaches on every --iface, and kernel IPVS otherwise.
    #[arg(long, value_enum, default_value_t = DataplaneMode::Auto)]
    dataplane: DataplaneMode,
    /// Interfaces to attach the XDP program to, comma separated (required for XDP; IPVS does not
    /// use them).
    #[arg(long, value_name = "IF[,IF...]", value_delimiter = ',')]
    iface: Vec<String>,
    /// IPVS: dummy interface holding the VIPs. A service is xlb's exactly when its VIP is on it.
    #[arg(long, value_name = "IF", default_value = DEFAULT_VIP_IFACE)]
    ipvs_vip_iface: String,
    /// bpffs directory for pinned maps and links.
    #[arg(long, default_value = maps::DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    /// XDP attach mode: auto tries native (driver) mode and falls back to generic with a warning.
    #[arg(long, value_enum, default_value_t = AttachMode::Auto)]
    xdp_mode: AttachMode,
    /// Load this eBPF object instead of the one embedded in the binary.
    #[arg(long, value_name = "PATH")]
    bpf_object: Option<PathBuf>,
    /// Capacity of the services map (frontends).
    #[arg(long, default_value_t = maps::MAX_SERVICES)]
    max_services: u32,
    /// Capacity of the backends map.
    #[arg(long, default_value_t = maps::MAX_BACKENDS)]
    max_backends: u32,
    /// Capacity of the conntrack map (two entries per flow).
    #[arg(long, default_value_t = maps::CONNTRACK_MAX)]
    conntrack_max: u32,
    /// Idle timeout of established TCP flows.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "15m")]
    tcp_timeout: Duration,
    /// Idle timeout of TCP flows after FIN or RST.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    tcp_closing_timeout: Duration,
    /// Idle timeout of UDP flows.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2m")]
    udp_timeout: Duration,
    /// Do not answer ICMP echo requests to VIPs.
    #[arg(long)]
    no_icmp_echo: bool,
    /// Minimum time between syncs (events in between are coalesced).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
    min_sync_period: Duration,
    /// Time between full resyncs that repair drift.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    sync_period: Duration,
    /// What to do with the attached XDP program on SIGINT/SIGTERM. IPVS services always stay
    /// (the kernel keeps forwarding; the next agent adopts them).
    #[arg(long, value_enum, default_value_t = OnExit::Detach)]
    on_exit: OnExit,
}

fn seconds(d: Duration) -> u32 {
    d.as_secs().clamp(1, u32::MAX as u64) as u32
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let config = Config {
        flags: if args.no_icmp_echo {
            0
        } else {
            CONFIG_F_ICMP_ECHO
        },
        tcp_timeout_s: seconds(args.tcp_timeout),
        tcp_closing_timeout_s: seconds(args.tcp_closing_timeout),
        udp_timeout_s: seconds(args.udp_timeout),
        ..Config::default()
    };
    let opts = LoadOptions {
        object: args.bpf_object.clone(),
        pin_dir: Some(args.pin_dir.clone()),
        max_services: args.max_services,
        max_backends: args.max_backends,
        conntrack_max: args.conntrack_max,
        config,
    };
    if args.dataplane == DataplaneMode::Xdp && args.iface.is_empty() {
        anyhow::bail!("--dataplane xdp needs --iface: the interfaces to attach the program to");
    }
    let xdp = XdpRequest {
        load: opts,
        ifaces: args.iface.clone(),
        mode: args.xdp_mode,
    };
    let ipvs = IpvsOptions {
        vip_iface: args.ipvs_vip_iface.clone(),
    };
    let mut chosen = select::choose(args.dataplane, &xdp, &ipvs)?.log();

    let (tx, rx) = mpsc::channel(16);
    let services = args.services.clone();
    let watcher = tokio::spawn(async move {
        if let Err(e) = file::watch(services, tx).await {
            error!("services file watcher stopped: {e:#}");
        }
    });

    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let shutdown = async move {
        tokio::select! {
            _ = sigint.recv() => info!("SIGINT: shutting down"),
            _ = sigterm.recv() => info!("SIGTERM: shutting down"),
        }
    };
    let periods = SyncPeriods {
        min_sync_period: args.min_sync_period,
        sync_period: args.sync_period,
    };
    Syncer::new(chosen.as_dyn(), "file")
        .run(rx, periods, shutdown)
        .await;
    watcher.abort();
    match (&mut chosen, args.on_exit) {
        (Chosen::Xdp(dataplane), OnExit::Detach) => dataplane.detach(),
        (Chosen::Xdp(dataplane), OnExit::Keep) => dataplane.keep_attached(),
        (Chosen::Ipvs(dataplane), _) => info!(
            iface = dataplane.vip_iface(),
            "IPVS services stay in the kernel and keep forwarding; the next agent adopts them"
        ),
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(false)
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start the async runtime")?;
    match cli.command {
        Command::Run(args) => runtime.block_on(run(args)),
    }
}
