//! `halyard`: the broker and its tools in one binary.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use tracing::{error, info};

mod admin;
mod bench;
mod config;
mod fdlimit;
mod passwd;
mod server;
mod store_cmd;
mod tools;

use config::{Config, DEFAULT_TOML};

/// mimalloc instead of glibc malloc: the per-message path allocates from several threads
/// (connection tasks, the store writer), and glibc's arena locks and consolidation showed up
/// as ~20% of broker CPU in `perf` (docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(name = "halyard", version, about = "Halyard MQTT broker and tools")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the broker.
    Serve {
        /// Configuration file (TOML). Without it, the built-in defaults apply.
        #[arg(long, short = 'c')]
        config: Option<PathBuf>,
        /// Listen on this URL (repeatable; tcp://, tls://, ws://, wss://, unix://, options
        /// as query parameters); replaces the configured listeners.
        #[arg(long = "listen", short = 'l', value_name = "URL")]
        listen: Vec<String>,
        /// Directory for the broker's state.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Print the default configuration, every key documented, and exit.
        #[arg(long)]
        print_default_config: bool,
    },
    /// Load generator: publisher/subscriber pairs with exact loss, duplicate and latency
    /// accounting.
    Bench(bench::BenchArgs),
    /// Manage a password file (mosquitto_passwd's flags; writes argon2id by default).
    Passwd(passwd::PasswdArgs),
    /// Publish a message (mosquitto_pub's flags and exit codes).
    Pub(Box<tools::publish::PubArgs>),
    /// Subscribe and print messages (mosquitto_sub's flags, -F formats and exit codes).
    Sub(Box<tools::subscribe::SubArgs>),
    /// Send an MQTT 5 request and print the reply; `rpc serve` answers requests.
    Rpc(Box<tools::rpc::RpcArgs>),
    /// Control a running broker: status, reload, stop.
    Ctl(tools::ctl::CtlArgs),
    /// Manage the admin API's keys (HTTP Basic: key name and secret).
    Apikey(admin::keys::ApikeyArgs),
    /// Bridges to other brokers.
    Bridge {
        #[command(subcommand)]
        command: BridgeCommand,
    },
    /// Inspect the broker's store (run while the broker is stopped).
    Store {
        #[command(subcommand)]
        command: store_cmd::StoreCommand,
    },
}

#[derive(Debug, Subcommand)]
enum BridgeCommand {
    /// Print a Mosquitto configuration's bridge blocks (`connection <name>` ...) as
    /// `[[bridge]]` tables; options that cannot be carried over are named on stderr.
    Import {
        /// The Mosquitto configuration file.
        file: PathBuf,
    },
}

fn bridge_cmd(c: &BridgeCommand) -> ExitCode {
    let BridgeCommand::Import { file } = c;
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("halyard bridge import: {}: {e}", file.display());
            return ExitCode::from(1);
        }
    };
    let r = halyard_bridge::import::mosquitto(&text);
    if r.bridges == 0 {
        eprintln!(
            "halyard bridge import: {}: no bridge (`connection <name>`) found",
            file.display()
        );
        return ExitCode::from(1);
    }
    print!("{}", r.toml);
    for n in &r.notes {
        eprintln!("{}:{n}", file.display());
    }
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            // mosquitto_pub/sub exit 1 on bad arguments; keep that for the client tools.
            let client_tool = std::env::args()
                .nth(1)
                .is_some_and(|a| matches!(a.as_str(), "pub" | "sub" | "rpc"));
            let _ = e.print();
            return if e.use_stderr() && client_tool {
                ExitCode::from(1)
            } else {
                ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2))
            };
        }
    };
    match cli.command {
        Command::Serve {
            config,
            listen,
            data_dir,
            print_default_config,
        } => {
            if print_default_config {
                print!("{DEFAULT_TOML}");
                return ExitCode::SUCCESS;
            }
            let source = server::ConfigSource {
                path: config,
                listen,
                data_dir,
            };
            match source.load() {
                Ok(cfg) => serve(cfg, source),
                Err(e) => {
                    eprintln!("halyard: config error: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Store { command } => store_cmd::run(&command),
        Command::Bridge { command } => bridge_cmd(&command),
        Command::Passwd(args) => passwd::run(&args),
        Command::Bench(args) => bench::run(&args),
        Command::Pub(args) => tools::publish::run(*args),
        Command::Sub(args) => tools::subscribe::run(*args),
        Command::Rpc(args) => tools::rpc::run(*args),
        Command::Ctl(args) => tools::ctl::run(&args),
        Command::Apikey(args) => admin::keys::run(&args),
    }
}

/// Sets up logging (text or JSON lines on stderr) and returns how to change the level
/// later (reload). `RUST_LOG`, when set, wins over the configured level.
fn init_logging(level: &str, format: &str) -> server::LogReload {
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter: Targets = std::env::var("RUST_LOG")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| level.parse().unwrap_or_default());
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    if format == "json" {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_current_span(true)
                    .with_span_list(false)
                    .with_writer(std::io::stderr),
            )
            .init();
    } else {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    // Colour codes only for a terminal, never into log files and journals.
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
            )
            .init();
    }
    Arc::new(move |level: &str| {
        let t: Targets = level.parse().map_err(|e| format!("log_level: {e}"))?;
        handle.reload(t).map_err(|e| format!("log_level: {e}"))
    })
}

fn serve(cfg: Config, source: server::ConfigSource) -> ExitCode {
    let log_reload = init_logging(&cfg.log_level, &cfg.log_format);
    // Before the runtime starts its threads (see `fdlimit::prepare`).
    let fds = fdlimit::prepare();
    tracing::debug!(
        limit_before = fds.before,
        limit = fds.now,
        table_slots = fds.presized,
        "open-file limit"
    );
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("halyard: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(run(cfg, source, log_reload))
}

async fn run(
    mut cfg: Config,
    source: server::ConfigSource,
    log_reload: server::LogReload,
) -> ExitCode {
    // Owner-only: it holds the store (payloads in clear), API keys and the pid file.
    if let Err(e) = halyard_store::private_dir(std::path::Path::new(&cfg.data_dir)) {
        error!(data_dir = %cfg.data_dir, error = %e, "cannot create the data directory");
        return ExitCode::FAILURE;
    }
    cfg.node_id = cfg.node_id();
    let store: Arc<dyn halyard_store::Store> = match cfg.persistence.mode() {
        None => {
            info!("persistence is off: state is kept in memory only");
            Arc::new(halyard_store::NullStore)
        }
        Some(sync) => {
            let mut lc = halyard_store::LogConfig::new(PathBuf::from(&cfg.data_dir).join("store"));
            lc.sync = sync;
            lc.compact_min_bytes = cfg.persistence.compact_min_bytes;
            match halyard_store::LogStore::open(lc) {
                Ok(s) => {
                    if let Some((at, why)) = &s.report().bad_tail {
                        tracing::warn!(
                            offset = at,
                            why,
                            discarded_bytes = s.report().bytes_discarded,
                            "store recovery cut off a damaged log tail"
                        );
                    }
                    Arc::new(s)
                }
                Err(e) => {
                    error!(data_dir = %cfg.data_dir, error = %e, "cannot open the store");
                    return ExitCode::FAILURE;
                }
            }
        }
    };
    let mut signals = match Signals::new() {
        Ok(s) => s,
        Err(e) => {
            error!(error = %e, "cannot install signal handlers");
            return ExitCode::FAILURE;
        }
    };
    let listener_cfgs = match cfg.listeners() {
        Ok(l) => l,
        Err(why) => {
            error!(why, "bad listener");
            return ExitCode::from(2);
        }
    };
    let security = match cfg.security() {
        Ok(s) => s,
        Err(why) => {
            error!("{why}");
            return ExitCode::from(2);
        }
    };
    let bridges = match cfg.bridges() {
        Ok(b) => b,
        Err(why) => {
            error!("{why}");
            return ExitCode::from(2);
        }
    };
    let broker = halyard_broker::Broker::new(cfg.broker(), store);
    broker.set_security(security);
    let monitor = broker.monitor().clone();
    monitor.spawn_logger();
    let mut registry = halyard_transport::Registry::default();
    if cfg.max_connections_per_ip > 0 || cfg.connection_rate_per_ip > 0 {
        registry = registry.with_ip_limits(halyard_transport::IpLimits::new(
            cfg.max_connections_per_ip,
            f64::from(cfg.connection_rate_per_ip),
        ));
    }
    let server = server::Server::new(
        broker.clone(),
        source,
        cfg.clone(),
        registry,
        Some(log_reload),
    );
    if let Err(e) = server.start_listeners(listener_cfgs).await {
        error!("{e}");
        return ExitCode::FAILURE;
    }
    let admin = if cfg.admin.enabled {
        // The admin listener is secondary: MQTT service goes on without it (loudly).
        match admin::start(server.clone()).await {
            Ok(a) => Some(a),
            Err(e) => {
                error!("admin API, metrics and dashboard are off: {e}");
                None
            }
        }
    } else {
        None
    };
    if let Err(why) = server.bridges.apply(bridges).await {
        error!("{why}");
        return ExitCode::FAILURE;
    }
    server.bridges.restore_api().await;
    admin::sys::spawn(server.clone());
    spawn_security_file_watch(&server);
    // For `halyard ctl`: written once the listeners are up, held locked while we run,
    // removed on a graceful exit.
    let pid_file = PathBuf::from(&cfg.data_dir).join(tools::ctl::PID_FILE);
    let pid_lock = tools::ctl::hold_pid_file(&pid_file)
        .inspect_err(|why| tracing::warn!("{why}; halyard ctl will not find this broker"))
        .ok();
    info!(
        version = env!("CARGO_PKG_VERSION"),
        data_dir = %cfg.data_dir,
        sync = %cfg.persistence.sync,
        admin = admin.as_ref().map(|a| a.to_string()),
        "halyard started"
    );
    // systemd Type=notify: ready once every listener is bound.
    sd_notify("READY=1");
    while let Signal::Reload = signals.next().await {
        // SIGHUP: the whole configuration again (passwords, ACLs, TLS files, limits, log
        // level, listeners). A broken configuration changes nothing and says why.
        info!("SIGHUP: reloading the configuration");
        sd_notify("RELOADING=1");
        if let Err(why) = server.reload().await {
            tracing::warn!("reload refused, nothing changed: {why}");
        }
        sd_notify("READY=1");
    }
    sd_notify("STOPPING=1");
    info!("signal received: shutting down gracefully (a second signal exits at once)");
    tokio::spawn(async move {
        while let Signal::Reload = signals.next().await {}
        eprintln!("halyard: second signal, exiting now");
        std::process::exit(130);
    });
    server.bridges.shutdown().await;
    broker.shutdown().await;
    server.join_listeners().await;
    if pid_lock.is_some() {
        let _ = std::fs::remove_file(&pid_file);
    }
    drop(pid_lock);
    info!("halyard stopped");
    ExitCode::SUCCESS
}

/// Tells systemd about our state when started as a `Type=notify` service (no-op
/// otherwise): one datagram to `$NOTIFY_SOCKET` (a path, or `@name` for an abstract socket).
fn sd_notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let send = || -> std::io::Result<()> {
        let sock = std::os::unix::net::UnixDatagram::unbound()?;
        let bytes = path.as_encoded_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(state.as_bytes(), &addr)?;
        } else {
            sock.send_to(state.as_bytes(), &path)?;
        }
        Ok(())
    };
    if let Err(e) = send() {
        tracing::warn!(error = %e, "sd_notify failed");
    }
}

enum Signal {
    /// SIGTERM or SIGINT.
    Stop,
    /// SIGHUP.
    Reload,
}

/// Reloads the password and ACL files when they change (length, modification time or inode:
/// in-place writes, atomic renames and symlink swaps alike), checked every 5 s, as SIGHUP
/// does. A broken file changes nothing and says why; it is tried again when it changes.
fn spawn_security_file_watch(server: &Arc<server::Server>) {
    use std::os::unix::fs::MetadataExt;
    let cfg = server.config();
    let files: Vec<PathBuf> = [&cfg.password_file, &cfg.acl_file]
        .into_iter()
        .flatten()
        .map(PathBuf::from)
        .collect();
    if files.is_empty() {
        return;
    }
    let stamp = move |files: &[PathBuf]| -> Vec<Option<(u64, std::time::SystemTime, u64)>> {
        files
            .iter()
            .map(|f| {
                let m = std::fs::metadata(f).ok()?;
                Some((m.len(), m.modified().ok()?, m.ino()))
            })
            .collect()
    };
    let server = server.clone();
    let broker = server.broker.clone();
    let mut shutdown = broker.shutdown_signal();
    tokio::spawn(async move {
        let mut seen = stamp(&files);
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = tokio::time::sleep(std::time::Duration::from_secs(5)) => {}
            }
            let now = stamp(&files);
            if now == seen {
                continue;
            }
            seen = now;
            // The configuration in force (a reload may have changed other settings).
            match server.config().security() {
                Ok(s) => {
                    info!("password/ACL file changed: reloaded");
                    broker.set_security(s);
                }
                Err(why) => {
                    tracing::warn!("security files refused, the previous ones stay in force: {why}")
                }
            }
        }
    });
}

/// The signals the broker acts on, registered once at start so that from then on
/// SIGHUP never takes its default action (terminating the process).
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    async fn next(&mut self) -> Signal {
        tokio::select! {
            _ = self.term.recv() => Signal::Stop,
            _ = self.int.recv() => Signal::Stop,
            _ = self.hup.recv() => Signal::Reload,
        }
    }
}
