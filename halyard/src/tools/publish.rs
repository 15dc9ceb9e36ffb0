//! `halyard pub`: mosquitto_pub's flags, messages and exit codes.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use halyard_client::{Bytes, Message, ProtocolVersion, QoS};
use tokio::io::AsyncBufReadExt;

use super::conn::{self, ConnArgs};

/// In-flight publishes `-l` keeps before waiting for acknowledgements.
const LINE_WINDOW: usize = 64;

#[derive(Debug, Args)]
#[command(disable_help_flag = true)]
pub(crate) struct PubArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// Topic to publish to.
    #[arg(short = 't', long = "topic")]
    topic: Option<String>,
    /// Message payload.
    #[arg(short = 'm', long = "message")]
    message: Option<String>,
    /// Send the contents of a file as the message.
    #[arg(short = 'f', long = "file")]
    file: Option<PathBuf>,
    /// Read messages from stdin, one per line.
    #[arg(short = 'l', long = "stdin-line")]
    lines: bool,
    /// Send a null (zero length) message.
    #[arg(short = 'n', long = "null-message")]
    null: bool,
    /// Read the whole of stdin as one message.
    #[arg(short = 's', long = "stdin-file")]
    stdin_file: bool,
    /// QoS.
    #[arg(short = 'q', long = "qos", default_value_t = 0)]
    qos: u8,
    /// Retain the message.
    #[arg(short = 'r', long = "retain")]
    retain: bool,
    /// Publish the message N times (with -m, -f, -s or -n).
    #[arg(long = "repeat", default_value_t = 1)]
    repeat: u32,
    /// Seconds between repeats (fractions allowed).
    #[arg(long = "repeat-delay", default_value_t = 0.0)]
    repeat_delay: f64,
}

pub(crate) fn run(a: PubArgs) -> ExitCode {
    conn::block_on(publish(a))
}

async fn publish(a: PubArgs) -> ExitCode {
    let from_url = match conn::url_parts(&a.conn) {
        Ok(f) => f,
        Err(e) => return conn::usage_error("pub", &e),
    };
    let topic = a.topic.clone().or_else(|| from_url.topic.clone());
    let modes = [
        a.message.is_some(),
        a.file.is_some(),
        a.lines,
        a.null,
        a.stdin_file,
    ]
    .iter()
    .filter(|m| **m)
    .count();
    if modes > 1 {
        return conn::usage_error("pub", "Only one type of message can be sent at once.");
    }
    let Some(topic) = topic.filter(|_| modes == 1) else {
        return conn::usage_error("pub", "Both topic and message must be supplied.");
    };
    if halyard_codec::TopicName::new(topic.as_str()).is_err()
        || topic.contains(['+', '#'])
        || topic.is_empty()
    {
        return conn::usage_error(
            "pub",
            &format!("Invalid publish topic '{topic}', does it contain '+' or '#'?"),
        );
    }
    let Some(qos) = QoS::from_u8(a.qos) else {
        return conn::usage_error("pub", "Invalid QoS given: must be 0, 1 or 2.");
    };
    let mut opts = match conn::client_options(&a.conn, "pub", &from_url, ProtocolVersion::V3_1_1) {
        Ok(o) => o,
        Err(e) => return conn::usage_error("pub", &e),
    };
    let props = match conn::apply_properties(&a.conn, &mut opts) {
        Ok(p) => p,
        Err(e) => return conn::usage_error("pub", &e),
    };
    let payload = if a.lines {
        None
    } else if let Some(m) = &a.message {
        Some(Bytes::from(m.clone()))
    } else if let Some(f) = &a.file {
        match std::fs::read(f) {
            Ok(b) => Some(Bytes::from(b)),
            Err(e) => {
                eprintln!("Error: Unable to read file \"{}\": {e}.", f.display());
                return ExitCode::from(1);
            }
        }
    } else if a.stdin_file {
        let mut buf = Vec::new();
        if let Err(e) = std::io::stdin().read_to_end(&mut buf) {
            eprintln!("Error: reading stdin: {e}.");
            return ExitCode::from(1);
        }
        Some(Bytes::from(buf))
    } else {
        Some(Bytes::new())
    };
    let quiet = a.conn.quiet;
    let client = match conn::connect(opts, quiet).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let make = |p: Bytes| {
        let mut m = Message::new(topic.as_str(), p).qos(qos).retain(a.retain);
        m.properties = props.publish.clone();
        m
    };
    let mut failed = false;
    match payload {
        Some(p) => {
            for i in 0..a.repeat.max(1) {
                if i > 0 && a.repeat_delay > 0.0 {
                    tokio::time::sleep(Duration::from_secs_f64(a.repeat_delay)).await;
                }
                if let Err(e) = client.publish(make(p.clone())).await {
                    if !quiet {
                        eprintln!(
                            "Warning: Publish {} failed: {}.",
                            i + 1,
                            conn::rejected_text(&e)
                        );
                    }
                    failed = true;
                }
            }
        }
        None => {
            let stdin = tokio::io::BufReader::new(tokio::io::stdin());
            let mut lines = stdin.split(b'\n');
            let mut pending = std::collections::VecDeque::new();
            let mut n = 0u64;
            loop {
                let line = match lines.next_segment().await {
                    Ok(Some(l)) => l,
                    Ok(None) => break,
                    Err(e) => {
                        eprintln!("Error: reading stdin: {e}.");
                        failed = true;
                        break;
                    }
                };
                n += 1;
                let line = line.strip_suffix(b"\r").map(<[u8]>::to_vec).unwrap_or(line);
                match client.publish_nowait(make(Bytes::from(line))).await {
                    Ok(d) => pending.push_back((n, d)),
                    Err(e) => {
                        if !quiet {
                            eprintln!("Warning: Publish {n} failed: {}.", conn::rejected_text(&e));
                        }
                        failed = true;
                    }
                }
                while pending.len() >= LINE_WINDOW {
                    if let Some((i, d)) = pending.pop_front() {
                        failed |= wait(i, d, quiet).await;
                    }
                }
            }
            for (i, d) in pending {
                failed |= wait(i, d, quiet).await;
            }
        }
    }
    let _ = client.disconnect().await;
    if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

async fn wait(i: u64, d: halyard_client::Delivery, quiet: bool) -> bool {
    match d.await {
        Ok(_) => false,
        Err(e) => {
            if !quiet {
                eprintln!("Warning: Publish {i} failed: {}.", conn::rejected_text(&e));
            }
            true
        }
    }
}
