//! `halyard sub`: mosquitto_sub's flags, output formats and exit codes.

use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use clap::Args;
use halyard_client::{
    ByteString, Message, ProtocolVersion, QoS, RetainHandling, SubscriptionOptions,
};

use super::conn::{self, ConnArgs, EXIT_TIMEOUT};
use super::format::Output;

#[derive(Debug, Args)]
#[command(disable_help_flag = true)]
pub(crate) struct SubArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// Topic filter to subscribe to (repeatable).
    #[arg(short = 't', long = "topic")]
    topics: Vec<String>,
    /// Do not print messages on topics matching this filter (repeatable).
    #[arg(short = 'T', long = "filter-out")]
    filter_out: Vec<String>,
    /// Unsubscribe from this filter first (repeatable; for persistent sessions).
    #[arg(short = 'U', long = "unsubscribe")]
    unsubscribe: Vec<String>,
    /// QoS of the subscriptions.
    #[arg(short = 'q', long = "qos", default_value_t = 0)]
    qos: u8,
    /// Exit after this many messages.
    #[arg(short = 'C', long = "count")]
    count: Option<u64>,
    /// Exit after this many seconds (exit code 27).
    #[arg(short = 'W', long = "timeout")]
    timeout: Option<u64>,
    /// Print the topic before the payload.
    #[arg(short = 'v', long = "verbose")]
    verbose: bool,
    /// Output format (mosquitto_sub's -F specifiers).
    #[arg(short = 'F', long = "format")]
    format: Option<String>,
    /// No end of line after each message.
    #[arg(short = 'N', long = "no-eol")]
    no_eol: bool,
    /// Do not print stale (retained) messages.
    #[arg(short = 'R', long = "no-retained")]
    no_retained: bool,
    /// Exit once subscribed.
    #[arg(short = 'E', long = "exit-after-subscribe")]
    exit_after_sub: bool,
    /// Print only retained messages; exit at the first live one.
    #[arg(long = "retained-only")]
    retained_only: bool,
    /// Clear every retained message received.
    #[arg(long = "remove-retained")]
    remove_retained: bool,
    /// Pretty-print %j / %J output.
    #[arg(long = "pretty")]
    pretty: bool,
    /// MQTT 5 no-local subscription option.
    #[arg(long = "nl")]
    no_local: bool,
    /// MQTT 5 retain-as-published subscription option.
    #[arg(long = "rap")]
    retain_as_published: bool,
    /// MQTT 5 retain handling: always, new or never.
    #[arg(long = "retain-handling")]
    retain_handling: Option<String>,
}

pub(crate) fn run(a: SubArgs) -> ExitCode {
    conn::block_on(subscribe(a))
}

fn valid_filter(f: &str) -> bool {
    halyard_codec::TopicFilter::new(f).is_ok() && !f.is_empty()
}

async fn subscribe(a: SubArgs) -> ExitCode {
    let from_url = match conn::url_parts(&a.conn) {
        Ok(f) => f,
        Err(e) => return conn::usage_error("sub", &e),
    };
    let mut topics = a.topics.clone();
    if let Some(t) = &from_url.topic {
        topics.push(t.clone());
    }
    if topics.is_empty() && a.unsubscribe.is_empty() {
        return conn::usage_error("sub", "You must specify a topic to subscribe to.");
    }
    for t in &topics {
        if !valid_filter(t) {
            return conn::usage_error(
                "sub",
                &format!(
                    "Invalid subscription topic '{t}', are all '+' and '#' wildcards correct?"
                ),
            );
        }
    }
    for t in &a.filter_out {
        if !valid_filter(t) {
            return conn::usage_error(
                "sub",
                &format!("Invalid filter topic '{t}', are all '+' and '#' wildcards correct?"),
            );
        }
    }
    for t in &a.unsubscribe {
        if !valid_filter(t) {
            return conn::usage_error(
                "sub",
                &format!("Invalid unsubscribe topic '{t}', are all '+' and '#' wildcards correct?"),
            );
        }
    }
    let Some(qos) = QoS::from_u8(a.qos) else {
        return conn::usage_error("sub", "Invalid QoS given: must be 0, 1 or 2.");
    };
    let retain_handling = match a.retain_handling.as_deref() {
        None | Some("always") => RetainHandling::SendOnSubscribe,
        Some("new") => RetainHandling::SendIfNew,
        Some("never") => RetainHandling::DoNotSend,
        Some(other) => {
            return conn::usage_error("sub", &format!("Invalid retain-handling value '{other}'."));
        }
    };
    if a.count == Some(0) {
        return conn::usage_error("sub", "Invalid -C value: must be at least 1.");
    }
    let mut opts = match conn::client_options(&a.conn, "sub", &from_url, ProtocolVersion::V3_1_1) {
        Ok(o) => o,
        Err(e) => return conn::usage_error("sub", &e),
    };
    let props = match conn::apply_properties(&a.conn, &mut opts) {
        Ok(p) => p,
        Err(e) => return conn::usage_error("sub", &e),
    };
    let filter_out: Vec<halyard_codec::TopicFilter> = a
        .filter_out
        .iter()
        .filter_map(|f| halyard_codec::TopicFilter::new(f.as_str()).ok())
        .collect();
    let output = Output {
        format: a.format.clone(),
        verbose: a.verbose,
        eol: !a.no_eol,
        pretty: a.pretty,
    };
    let quiet = a.conn.quiet;
    let version = opts.protocol;
    // The -W clock starts once connected, as mosquitto_sub's does.
    let client = match conn::connect(opts, quiet).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let deadline = a
        .timeout
        .map(|s| tokio::time::Instant::now() + Duration::from_secs(s));
    for t in &a.unsubscribe {
        if let Err(e) = client.unsubscribe(t.as_str()).await
            && !quiet
        {
            eprintln!("Error: unsubscribe from '{t}': {}", conn::rejected_text(&e));
        }
    }
    if topics.is_empty() {
        let _ = client.disconnect().await;
        return ExitCode::SUCCESS;
    }
    let options = SubscriptionOptions {
        qos,
        no_local: a.no_local,
        retain_as_published: a.retain_as_published,
        retain_handling,
    };
    let filters: Vec<(ByteString, SubscriptionOptions)> = topics
        .iter()
        .map(|t| (ByteString::from(t.as_str()), options))
        .collect();
    let mut sub = match client
        .subscribe_many(filters, props.subscribe_user.clone())
        .await
    {
        Ok(s) => s,
        Err(halyard_client::Error::Rejected { .. }) => {
            if !quiet {
                eprintln!("All subscription requests were denied.");
            }
            let _ = client.disconnect().await;
            return ExitCode::from(1);
        }
        Err(e) => return conn::report(&e, version, quiet),
    };
    for (t, g) in topics.iter().zip(sub.grants()) {
        if let Err(r) = g
            && !quiet
        {
            eprintln!(
                "Warning: Subscription to '{t}' denied: {}.",
                halyard_client::reason_text(*r)
            );
        }
    }
    if a.exit_after_sub {
        let _ = client.disconnect().await;
        return ExitCode::SUCCESS;
    }
    let mut stdout = std::io::stdout().lock();
    let mut printed = 0u64;
    let mut buf = Vec::with_capacity(1024);
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let code = loop {
        let msg: Option<Message> = tokio::select! {
            m = sub.recv() => m,
            () = sleep_until(deadline) => {
                if !quiet {
                    eprintln!("Timed out");
                }
                break ExitCode::from(EXIT_TIMEOUT);
            }
            _ = &mut interrupted => break ExitCode::SUCCESS,
            _ = async {
                match term.as_mut() {
                    Some(t) => t.recv().await,
                    None => std::future::pending().await,
                }
            } => break ExitCode::SUCCESS,
        };
        let Some(mut m) = msg else {
            // The client closed: the connection was lost and could not be restored.
            if !quiet {
                eprintln!("Error: the connection to the broker was lost.");
            }
            break ExitCode::from(1);
        };
        // The identifiers are the client's own routing tags, not the user's: print what
        // mosquitto_sub prints for a subscription without one.
        m.properties.subscription_identifiers.clear();
        if filter_out.iter().any(|f| f.matches(&m.topic)) {
            continue;
        }
        if a.retained_only && !m.retain {
            break ExitCode::SUCCESS;
        }
        if a.remove_retained && m.retain && !m.payload.is_empty() {
            let clear = Message::new(m.topic.clone(), "")
                .retain(true)
                .qos(QoS::AtLeastOnce);
            if let Err(e) = client.publish_nowait(clear).await
                && !quiet
            {
                eprintln!("Error: removing retained '{}': {e}", m.topic);
            }
        }
        if a.no_retained && m.retain {
            continue;
        }
        buf.clear();
        if let Some(err) = output.render(&m, SystemTime::now(), &mut buf)
            && !quiet
        {
            eprintln!("{err}");
        }
        if stdout
            .write_all(&buf)
            .and_then(|()| stdout.flush())
            .is_err()
        {
            // Our reader went away (a closed pipe): stop quietly.
            break ExitCode::SUCCESS;
        }
        printed += 1;
        if a.count.is_some_and(|c| printed >= c) {
            break ExitCode::SUCCESS;
        }
    };
    let _ = client.disconnect().await;
    code
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
