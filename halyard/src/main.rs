//! `halyard`: the broker and its tools in one binary.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use tracing::{error, info};

mod bench;
mod config;
mod listen;
mod store_cmd;

use config::{Config, DEFAULT_TOML};

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
        /// Listen on this URL (repeatable); replaces the configured listeners.
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
    /// Inspect the broker's store (run while the broker is stopped).
    Store {
        #[command(subcommand)]
        command: store_cmd::StoreCommand,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
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
            let mut cfg = match config {
                Some(path) => match Config::load(&path) {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("halyard: config error: {}", e.0);
                        return ExitCode::from(2);
                    }
                },
                None => Config::default(),
            };
            if !listen.is_empty() {
                for url in &listen {
                    if let Err(why) = listen::parse(url) {
                        eprintln!("halyard: --listen: {why}");
                        return ExitCode::from(2);
                    }
                }
                cfg.listen = listen;
            }
            if let Some(d) = data_dir {
                cfg.data_dir = d.display().to_string();
            }
            serve(cfg)
        }
        Command::Store { command } => store_cmd::run(&command),
        Command::Bench(args) => bench::run(&args),
    }
}

fn init_logging(level: &str) {
    use tracing_subscriber::filter::Targets;
    let filter: Targets = std::env::var("RUST_LOG")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| level.parse().unwrap_or_default());
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .with(filter)
        .init();
}

fn serve(cfg: Config) -> ExitCode {
    init_logging(&cfg.log_level);
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
    rt.block_on(run(cfg))
}

async fn run(cfg: Config) -> ExitCode {
    if let Err(e) = std::fs::create_dir_all(&cfg.data_dir) {
        error!(data_dir = %cfg.data_dir, error = %e, "cannot create the data directory");
        return ExitCode::FAILURE;
    }
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
    let broker = halyard_broker::Broker::new(cfg.broker(), store);
    let mut listeners = Vec::new();
    for url in &cfg.listen {
        let listen::Endpoint::Tcp(addr) = match listen::parse(url) {
            Ok(e) => e,
            Err(why) => {
                error!(url, why, "bad listener");
                return ExitCode::from(2);
            }
        };
        match halyard_transport::bind_tcp(&addr).await {
            Ok(l) => {
                info!(url, "listening");
                let b = broker.clone();
                listeners.push(tokio::spawn(halyard_transport::serve_tcp(
                    l,
                    broker.shutdown_signal(),
                    move |s, peer| b.spawn_connection(s, peer),
                )));
            }
            Err(e) => {
                error!("{e}");
                return ExitCode::FAILURE;
            }
        }
    }
    info!(
        version = env!("CARGO_PKG_VERSION"),
        data_dir = %cfg.data_dir,
        sync = %cfg.persistence.sync,
        "halyard started"
    );
    wait_for_signal().await;
    info!("signal received: shutting down gracefully (a second signal exits at once)");
    tokio::spawn(async {
        wait_for_signal().await;
        eprintln!("halyard: second signal, exiting now");
        std::process::exit(130);
    });
    broker.shutdown().await;
    for l in listeners {
        let _ = l.await;
    }
    info!("halyard stopped");
    ExitCode::SUCCESS
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut term) = signal(SignalKind::terminate()) else {
            let _ = tokio::signal::ctrl_c().await;
            return;
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
