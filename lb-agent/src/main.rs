//! `lb-agent`: the xlb node agent.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use lb_agent::{
    cli::{
        cleanup::CleanupArgs, inspect::InspectArgs, preflight::PreflightArgs, status::StatusArgs,
    },
    dataplane::{
        ipvs::{DEFAULT_VIP_IFACE, IpvsOptions},
        select::{self, Chosen, DataplaneMode, XdpRequest},
        xdp::{AttachMode, LoadOptions},
    },
    health::{Endpoints, Health},
    kube_proxy_config::{self, KubeProxyConfig},
    metrics::Metrics,
    model::{Scheduler, parse_scheduler},
    service_health::ServiceHealthServer,
    source::{
        file,
        kubernetes::{self, ClusterAccess, translate::NodeSettings},
    },
    status::{AgentStatus, DEFAULT_STATUS_FILE, DataplaneStatus, StatusBoard, unix_now},
    sync::{SyncPeriods, Syncer},
};
use lb_common::{CONFIG_F_ICMP_ECHO, Config, maps};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use tracing::{error, info, warn};

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
    /// Load the dataplane, program it from the services file (standalone) or the cluster
    /// (Kubernetes mode), and keep it in sync.
    Run(Box<RunArgs>),
    /// Print the pinned XDP maps (services, backends, flows, stats), with the agent running or
    /// not.
    Inspect(InspectArgs),
    /// Print what the running agent reports: dataplane, last sync, errors. Exit code 0 when
    /// healthy, 1 otherwise.
    Status(StatusArgs),
    /// Check whether XDP or IPVS can run on this node. Exit code: 0 XDP, 10 IPVS only,
    /// 20 neither.
    Preflight(PreflightArgs),
    /// Remove everything xlb created (XDP links, pinned maps, IPVS services, the VIP interface),
    /// for a rollback. Stop the agent first.
    Cleanup(CleanupArgs),
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
    #[arg(long, value_name = "FILE", conflicts_with = "kubeconfig")]
    services: Option<PathBuf>,
    /// Kubernetes mode: watch the cluster this kubeconfig points at. Without it (and without
    /// --services) an agent running in a pod uses its service account.
    #[arg(long, value_name = "FILE")]
    kubeconfig: Option<PathBuf>,
    /// This node's name (Kubernetes mode): its addresses serve NodePorts, its endpoints are
    /// node-local.
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// A kube-proxy KubeProxyConfiguration file (kubeproxy.config.k8s.io/v1alpha1). Command-line
    /// flags win over its values.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Default scheduler (maglev|mh, rr, wrr, sh, lc, wlc) of Kubernetes Services; the
    /// xlb.io/scheduler annotation overrides it per Service. Default: ipvs.scheduler of --config,
    /// else maglev.
    #[arg(long, value_parser = parse_scheduler_arg)]
    scheduler: Option<Scheduler>,
    /// Address of the /healthz, /metrics and /status listener. Default: metricsBindAddress of
    /// --config, else 127.0.0.1:10249 in Kubernetes mode and none in standalone mode (a lab
    /// or migration host may run kube-proxy on that port).
    #[arg(long, value_name = "ADDR:PORT")]
    metrics_bind_address: Option<SocketAddr>,
    /// Where to write the agent's status after every sync (read by `lb-agent status`).
    #[arg(long, value_name = "FILE", default_value = DEFAULT_STATUS_FILE)]
    status_file: PathBuf,
    /// Do not write a status file.
    #[arg(long, conflicts_with = "status_file")]
    no_status_file: bool,
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
    /// Minimum time between syncs (events in between are coalesced). Default: ipvs.minSyncPeriod
    /// of --config, else 1s.
    #[arg(long, value_parser = humantime::parse_duration)]
    min_sync_period: Option<Duration>,
    /// Time between full resyncs that repair drift. Default: ipvs.syncPeriod of --config, else 30s.
    #[arg(long, value_parser = humantime::parse_duration)]
    sync_period: Option<Duration>,
    /// Time between conntrack housekeeping passes: expired flows and affinity pins are deleted,
    /// and the lc/wlc active-flow counts recounted.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    maintenance_period: Duration,
    /// What to do with the attached XDP program on SIGINT/SIGTERM. IPVS services always stay
    /// (the kernel keeps forwarding; the next agent adopts them).
    #[arg(long, value_enum, default_value_t = OnExit::Detach)]
    on_exit: OnExit,
}

fn parse_scheduler_arg(name: &str) -> Result<Scheduler, String> {
    parse_scheduler(name).ok_or_else(|| format!("unknown scheduler {name:?}"))
}

/// Where the desired state comes from.
enum Source {
    File(PathBuf),
    Kubernetes {
        access: ClusterAccess,
        settings: NodeSettings,
    },
}

/// Default listener of /healthz in Kubernetes mode (kube-proxy's metricsBindAddress default).
const DEFAULT_METRICS_BIND_ADDRESS: &str = "127.0.0.1:10249";

fn seconds(d: Duration) -> u32 {
    d.as_secs().clamp(1, u32::MAX as u64) as u32
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    // Everything that can be wrong with the arguments fails before the dataplane is touched.
    let proxy_config = match &args.config {
        Some(path) => {
            let c = kube_proxy_config::load(path)?;
            report_proxy_config(path, &c);
            c
        }
        None => KubeProxyConfig::default(),
    };
    let source = match (
        &args.services,
        kubernetes::access(args.kubeconfig.as_deref()),
    ) {
        (Some(path), _) => Source::File(path.clone()),
        (None, Some(access)) => {
            let node_name = args.node_name.clone().filter(|n| !n.is_empty()).context(
                "Kubernetes mode needs this node's name: --node-name or the NODE_NAME environment variable",
            )?;
            Source::Kubernetes {
                access,
                settings: NodeSettings {
                    node_name,
                    node_port_addresses: proxy_config.node_port_addresses.clone(),
                    default_scheduler: args
                        .scheduler
                        .or(proxy_config.scheduler)
                        .unwrap_or(Scheduler::Maglev),
                },
            }
        }
        (None, None) => anyhow::bail!(
            "no source: give --services FILE (standalone) or --kubeconfig FILE (Kubernetes; in a pod the service account is used)"
        ),
    };
    let periods = SyncPeriods {
        min_sync_period: args
            .min_sync_period
            .or(proxy_config.min_sync_period)
            .unwrap_or(SyncPeriods::default().min_sync_period),
        sync_period: args
            .sync_period
            .or(proxy_config.sync_period)
            .unwrap_or(SyncPeriods::default().sync_period),
        maintenance_period: args.maintenance_period,
    };
    let health_addr = args
        .metrics_bind_address
        .or(proxy_config.metrics_bind_address)
        .or(matches!(source, Source::Kubernetes { .. })
            .then(|| DEFAULT_METRICS_BIND_ADDRESS.parse().unwrap()));

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
    let default_scheduler = match &source {
        Source::File(_) => parse_scheduler(file::DEFAULT_SCHEDULER).unwrap_or_default(),
        Source::Kubernetes { settings, .. } => settings.default_scheduler,
    }
    .ipvs_name();
    let source_name = match &source {
        Source::File(_) => "file",
        Source::Kubernetes { .. } => "kubernetes",
    };
    let choice = select::choose(args.dataplane, &xdp, &ipvs)?;
    choice.log(default_scheduler);
    let reason = choice.reason.clone();
    let mut chosen = choice.dataplane;
    let is_xdp = matches!(chosen, Chosen::Xdp(_));

    let health = Health::new(periods.sync_period);
    let metrics = Metrics::new(chosen.kind(), &reason, is_xdp.then(|| args.pin_dir.clone()));
    let status = StatusBoard::new(
        AgentStatus {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            started_at: unix_now(),
            source: source_name.to_owned(),
            dataplane: DataplaneStatus {
                mode: chosen.kind().to_owned(),
                reason,
                default_scheduler: default_scheduler.to_owned(),
                pin_dir: is_xdp.then(|| args.pin_dir.clone()),
                interfaces: if is_xdp { args.iface.clone() } else { vec![] },
            },
            stale_after_s: health.stale_after().as_secs_f64(),
            ..AgentStatus::default()
        },
        (!args.no_status_file).then(|| args.status_file.clone()),
    );
    if let Some(addr) = health_addr {
        let endpoints = Endpoints {
            health: health.clone(),
            metrics: Some(metrics.clone()),
            status: Some(status.clone()),
        };
        lb_agent::health::serve(addr, endpoints).await?;
    }

    let (tx, rx) = mpsc::channel(16);
    let watcher = match source {
        Source::File(services) => tokio::spawn(async move {
            if let Err(e) = file::watch(services, tx).await {
                error!("services file watcher stopped: {e:#}");
            }
        }),
        Source::Kubernetes { access, settings } => {
            let client = kubernetes::client(&access).await?;
            tokio::spawn(async move {
                if let Err(e) = kubernetes::watch(client, settings, tx).await {
                    error!("Kubernetes watches stopped: {e:#}");
                }
            })
        }
    };

    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let shutdown = async move {
        tokio::select! {
            _ = sigint.recv() => info!("SIGINT: shutting down"),
            _ = sigterm.recv() => info!("SIGTERM: shutting down"),
        }
    };
    Syncer::new(chosen.as_dyn(), source_name)
        .with_service_health(ServiceHealthServer::new(health.clone()))
        .with_health(health)
        .with_metrics(metrics)
        .with_status(status)
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

/// One line with what the KubeProxyConfiguration set, one with what it has that xlb ignores.
fn report_proxy_config(path: &std::path::Path, c: &KubeProxyConfig) {
    info!(
        path = %path.display(),
        mode = %c.mode,
        scheduler = ?c.scheduler.map(|s| s.ipvs_name()),
        sync_period = ?c.sync_period,
        min_sync_period = ?c.min_sync_period,
        metrics_bind_address = ?c.metrics_bind_address,
        node_port_addresses = ?c.node_port_addresses,
        exclude_cidrs = ?c.exclude_cidrs,
        cluster_cidrs = ?c.cluster_cidrs,
        "kube-proxy configuration loaded (excludeCIDRs and clusterCIDR are checked but change nothing: xlb only touches its own maps and does not masquerade)"
    );
    if c.mode == "ipvs" {
        info!("mode ipvs: xlb programs its own dataplane with the same semantics");
    }
    if !c.ignored.is_empty() {
        warn!(fields = %c.ignored.join(","), "kube-proxy configuration fields ignored by xlb");
    }
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
    let code = match cli.command {
        Command::Run(args) => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("start the async runtime")?;
            runtime.block_on(run(*args))?;
            0
        }
        Command::Inspect(args) => lb_agent::cli::inspect::run(&args)?,
        Command::Status(args) => lb_agent::cli::status::run(&args)?,
        Command::Preflight(args) => lb_agent::cli::preflight::run(&args)?,
        Command::Cleanup(args) => lb_agent::cli::cleanup::run(&args)?,
    };
    std::process::exit(code)
}
