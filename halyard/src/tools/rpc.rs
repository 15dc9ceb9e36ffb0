//! `halyard rpc`: one MQTT 5 request, its reply printed; `halyard rpc serve`: answer
//! requests by echoing them or by running a command (handy for health checks).

use std::io::Write;
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use clap::{Args, Subcommand};
use halyard_client::{Bytes, Message, ProtocolVersion, QoS};
use tokio::io::AsyncWriteExt;

use super::conn::{self, ConnArgs, EXIT_TIMEOUT};
use super::format::Output;

#[derive(Debug, Args)]
#[command(disable_help_flag = true, args_conflicts_with_subcommands = true)]
pub(crate) struct RpcArgs {
    #[command(subcommand)]
    command: Option<RpcCommand>,
    #[command(flatten)]
    request: RequestArgs,
}

#[derive(Debug, Subcommand)]
enum RpcCommand {
    /// Answer requests on a topic filter: echo them, or reply with a command's output.
    Serve(ServeArgs),
}

#[derive(Debug, Args)]
#[command(disable_help_flag = true)]
struct RequestArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// Topic to send the request to.
    #[arg(short = 't', long = "topic")]
    topic: Option<String>,
    /// Request payload.
    #[arg(short = 'm', long = "message")]
    message: Option<String>,
    /// Send an empty request.
    #[arg(short = 'n', long = "null-message")]
    null: bool,
    /// QoS of the request.
    #[arg(short = 'q', long = "qos", default_value_t = 1)]
    qos: u8,
    /// Seconds to wait for the reply (exit code 27 when none comes).
    #[arg(short = 'W', long = "timeout", default_value_t = 10)]
    timeout: u64,
    /// Print the reply's topic too.
    #[arg(short = 'v', long = "verbose")]
    verbose: bool,
    /// Output format for the reply (mosquitto_sub's -F specifiers).
    #[arg(short = 'F', long = "format")]
    format: Option<String>,
    /// No end of line after the reply.
    #[arg(short = 'N', long = "no-eol")]
    no_eol: bool,
}

#[derive(Debug, Args)]
#[command(disable_help_flag = true)]
struct ServeArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// Topic filter to answer requests on.
    #[arg(short = 't', long = "topic")]
    topic: Option<String>,
    /// Reply with the request's payload.
    #[arg(long = "echo")]
    echo: bool,
    /// Exit after answering this many requests.
    #[arg(short = 'C', long = "count")]
    count: Option<u64>,
    /// Command to run per request: the request payload on its stdin, its stdout is the
    /// reply (no reply when it fails); HALYARD_TOPIC holds the request topic.
    #[arg(last = true)]
    command: Vec<String>,
}

pub(crate) fn run(a: RpcArgs) -> ExitCode {
    conn::block_on(async move {
        match a.command {
            Some(RpcCommand::Serve(s)) => serve(s).await,
            None => request(a.request).await,
        }
    })
}

fn options(c: &ConnArgs) -> Result<halyard_client::ClientOptions, String> {
    let from_url = conn::url_parts(c)?;
    // Request/response is an MQTT 5 feature: the default here, unlike pub and sub.
    let mut o = conn::client_options(c, "rpc", &from_url, ProtocolVersion::V5)?;
    conn::apply_properties(c, &mut o)?;
    if !o.protocol.is_v5() {
        return Err("request/response needs MQTT v5 (-V mqttv5).".into());
    }
    Ok(o)
}

async fn request(a: RequestArgs) -> ExitCode {
    let Some(topic) = a.topic.clone() else {
        return conn::usage_error("rpc", "A request topic (-t) must be supplied.");
    };
    if a.message.is_none() && !a.null {
        return conn::usage_error("rpc", "A request payload (-m or -n) must be supplied.");
    }
    let Some(qos) = QoS::from_u8(a.qos) else {
        return conn::usage_error("rpc", "Invalid QoS given: must be 0, 1 or 2.");
    };
    let o = match options(&a.conn) {
        Ok(o) => o,
        Err(e) => return conn::usage_error("rpc", &e),
    };
    let quiet = a.conn.quiet;
    let version = o.protocol;
    let client = match conn::connect(o, quiet).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let msg = Message::new(topic.as_str(), a.message.clone().unwrap_or_default()).qos(qos);
    let code = match client
        .request_with(msg, Duration::from_secs(a.timeout))
        .await
    {
        Ok(mut reply) => {
            reply.properties.subscription_identifiers.clear();
            let out = Output {
                format: a.format.clone(),
                verbose: a.verbose,
                eol: !a.no_eol,
                pretty: false,
            };
            let mut buf = Vec::new();
            if let Some(e) = out.render(&reply, SystemTime::now(), &mut buf) {
                eprintln!("{e}");
            }
            let _ = std::io::stdout().write_all(&buf);
            ExitCode::SUCCESS
        }
        Err(halyard_client::Error::Timeout) => {
            if !quiet {
                eprintln!("Timed out");
            }
            ExitCode::from(EXIT_TIMEOUT)
        }
        Err(e) => conn::report(&e, version, quiet),
    };
    let _ = client.disconnect().await;
    code
}

async fn serve(a: ServeArgs) -> ExitCode {
    let Some(filter) = a.topic.clone() else {
        return conn::usage_error("rpc serve", "A topic filter (-t) must be supplied.");
    };
    if a.echo != a.command.is_empty() {
        return conn::usage_error("rpc serve", "Give either --echo or a command after --.");
    }
    let o = match options(&a.conn) {
        Ok(o) => o,
        Err(e) => return conn::usage_error("rpc serve", &e),
    };
    let quiet = a.conn.quiet;
    let version = o.protocol;
    let client = match conn::connect(o, quiet).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let command = Arc::new(a.command.clone());
    let echo = a.echo;
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<()>(64);
    let handle = match client
        .serve(filter.as_str(), move |m: Message| {
            let command = command.clone();
            let done = done_tx.clone();
            async move {
                let reply = if echo {
                    Some(m.payload.clone())
                } else {
                    run_command(&command, &m).await
                };
                let _ = done.send(()).await;
                reply
            }
        })
        .await
    {
        Ok(h) => h,
        Err(e) => return conn::report(&e, version, quiet),
    };
    let mut answered = 0u64;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = async {
                match term.as_mut() {
                    Some(t) => t.recv().await,
                    None => std::future::pending().await,
                }
            } => break,
            d = done_rx.recv() => {
                if d.is_none() {
                    break;
                }
                answered += 1;
                if a.count.is_some_and(|c| answered >= c) {
                    // Let the last reply go out before closing.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    break;
                }
            }
        }
    }
    handle.stop();
    let _ = client.disconnect().await;
    ExitCode::SUCCESS
}

async fn run_command(command: &[String], m: &Message) -> Option<Bytes> {
    let mut child = tokio::process::Command::new(&command[0])
        .args(&command[1..])
        .env("HALYARD_TOPIC", m.topic.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| eprintln!("Error: cannot run '{}': {e}", command[0]))
        .ok()?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(&m.payload).await;
    }
    let out = child.wait_with_output().await.ok()?;
    if out.status.success() {
        Some(Bytes::from(out.stdout))
    } else {
        eprintln!("'{}' failed ({}): no reply sent", command[0], out.status);
        None
    }
}
