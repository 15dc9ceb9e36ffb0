//! `halyard pub` / `halyard sub` next to `mosquitto_pub` / `mosquitto_sub`: the same
//! command line must give the same output and exit code, against the Mosquitto broker and
//! against the Halyard broker. Messages are retained before the subscriber starts, so the
//! subscriber receives them at subscribe time: no sleeping, no races.

mod common;

use common::{
    BrokerProc, free_port, halyard_bin, run, run_with_stdin, start_halyard, start_mosquitto,
};

struct Res {
    out: String,
    err: String,
    code: i32,
}

fn ours(tool: &str, args: &[&str]) -> Res {
    let mut a = vec![tool];
    a.extend_from_slice(args);
    let (out, err, code) = run(halyard_bin(), &a);
    Res { out, err, code }
}

fn theirs(tool: &str, args: &[&str]) -> Res {
    let (out, err, code) = run(&format!("mosquitto_{tool}"), args);
    Res { out, err, code }
}

/// Runs both tools with the same arguments and checks stdout and exit code agree, and
/// that our first stderr line is mosquitto's.
fn same(tool: &str, args: &[&str], what: &str) -> Res {
    let m = theirs(tool, args);
    let h = ours(tool, args);
    assert_eq!(
        h.code, m.code,
        "{what}: exit code (ours vs mosquitto_{tool}); stderr ours={:?} theirs={:?}",
        h.err, m.err
    );
    assert_eq!(h.out, m.out, "{what}: stdout");
    assert_eq!(
        h.err.lines().next(),
        m.err.lines().next(),
        "{what}: first stderr line"
    );
    h
}

fn brokers() -> Vec<BrokerProc> {
    vec![start_mosquitto(), start_halyard()]
}

fn retain(port: u16, topic: &str, msg: &str, extra: &[&str]) {
    let p = port.to_string();
    let mut args = vec!["-p", p.as_str(), "-t", topic, "-m", msg, "-r", "-q", "1"];
    args.extend_from_slice(extra);
    let (_, err, code) = run("mosquitto_pub", &args);
    assert_eq!(code, 0, "retain {topic}: {err}");
}

#[test]
fn missing_broker_same_message_and_exit_code() {
    let port = free_port().to_string();
    for v in ["mqttv311", "mqttv5"] {
        let r = same("sub", &["-p", &port, "-t", "a", "-V", v], "sub, no broker");
        assert_eq!(r.code, 1);
        assert_eq!(r.err.trim(), "Error: Connection refused");
        same(
            "pub",
            &["-p", &port, "-t", "a", "-m", "x", "-V", v],
            "pub, no broker",
        );
    }
}

#[test]
fn auth_failure_same_message_and_exit_code() {
    for b in brokers() {
        let port = b.auth_port.to_string();
        // 3.1.1: the CONNACK return code is the exit code: 5 (not authorised) from
        // mosquitto, 4 (bad user name or password) from Halyard.
        let r = same(
            "sub",
            &["-p", &port, "-t", "a", "-u", "bob", "-P", "no"],
            b.name,
        );
        assert!(r.code == 4 || r.code == 5, "{}: {}", b.name, r.code);
        same(
            "pub",
            &["-p", &port, "-t", "a", "-m", "x", "-u", "bob", "-P", "no"],
            b.name,
        );
        // 5.0: the reason code; mosquitto refuses a bad password with 0x87 Not authorized,
        // Halyard with 0x86 Bad User Name or Password [MQTT-3.1.4-?]: each tool prints what its
        // broker said, so compare the tools against the same broker.
        let r5 = same(
            "sub",
            &["-p", &port, "-t", "a", "-u", "bob", "-P", "no", "-V", "5"],
            b.name,
        );
        assert!(
            r5.code == 0x86 || r5.code == 0x87,
            "{}: {}",
            b.name,
            r5.code
        );
        // The right password works with both tools.
        same(
            "sub",
            &["-p", &port, "-t", "a", "-u", "alice", "-P", "secret", "-E"],
            b.name,
        );
    }
}

#[test]
fn count_and_timeout_same_output_and_exit_code() {
    for b in brokers() {
        let port = b.port.to_string();
        let t = format!("cli/{}/count", b.name);
        retain(b.port, &format!("{t}/1"), "hello", &[]);
        retain(b.port, &format!("{t}/2"), "world", &[]);
        for v in ["mqttv311", "mqttv5"] {
            let r = same(
                "sub",
                &[
                    "-p",
                    &port,
                    "-t",
                    &format!("{t}/1"),
                    "-t",
                    &format!("{t}/2"),
                    "-C",
                    "2",
                    "-v",
                    "-V",
                    v,
                ],
                "-C 2 -v",
            );
            assert_eq!(r.out, format!("{t}/1 hello\n{t}/2 world\n"));
            assert_eq!(r.code, 0);
            // -W: no message within the time, exit 27 and "Timed out".
            let r = same(
                "sub",
                &["-p", &port, "-t", "cli/nothing/here", "-W", "1", "-V", v],
                "-W 1",
            );
            assert_eq!(r.code, 27);
            assert_eq!(r.err.trim(), "Timed out");
            // -R hides retained messages; -W ends it.
            let r = same(
                "sub",
                &[
                    "-p",
                    &port,
                    "-t",
                    &format!("{t}/1"),
                    "-R",
                    "-W",
                    "1",
                    "-V",
                    v,
                ],
                "-R",
            );
            assert_eq!(r.out, "");
            // --retained-only prints the retained ones.
            same(
                "sub",
                &[
                    "-p",
                    &port,
                    "-t",
                    &format!("{t}/#"),
                    "--retained-only",
                    "-C",
                    "1",
                    "-F",
                    "%t %p %r",
                    "-V",
                    v,
                ],
                "--retained-only",
            );
        }
    }
}

/// Every -F specifier that does not print the clock, for a v5 message with properties and
/// for a plain one; %j with its timestamp masked; %J with a JSON payload.
#[test]
fn format_specifiers_match_mosquitto_sub() {
    for b in brokers() {
        let port = b.port.to_string();
        let t = format!("cli/{}/fmt", b.name);
        retain(
            b.port,
            &format!("{t}/props"),
            "he\"llo",
            &[
                "-V",
                "5",
                "-D",
                "publish",
                "user-property",
                "a",
                "b",
                "-D",
                "publish",
                "content-type",
                "text/x",
                "-D",
                "publish",
                "correlation-data",
                "cd1",
                "-D",
                "publish",
                "response-topic",
                "rt/1",
                "-D",
                "publish",
                "payload-format-indicator",
                "1",
            ],
        );
        retain(
            b.port,
            &format!("{t}/json"),
            r#"{"a": [1, 2], "z": {"y": null}}"#,
            &[],
        );
        let spec =
            r"%t|%p|%x|%X|%l|%q|%r|%C|%D|%F|%P|%R|%S|%A|%10t|%-10t|%.2t|%5l|%05l|%-5l|%%|\t|\\|@@";
        for v in ["mqttv311", "mqttv5"] {
            for topic in ["props", "json"] {
                let topic = format!("{t}/{topic}");
                same(
                    "sub",
                    &["-p", &port, "-t", &topic, "-C", "1", "-F", spec, "-V", v],
                    &format!("{} {v} -F {topic}", b.name),
                );
                same(
                    "sub",
                    &["-p", &port, "-t", &topic, "-C", "1", "-N", "-v", "-V", v],
                    "-N -v",
                );
                // %j / %J: mask the timestamp, the rest must be byte for byte the same.
                for f in ["%j", "%J"] {
                    let m = theirs(
                        "sub",
                        &["-p", &port, "-t", &topic, "-C", "1", "-F", f, "-V", v],
                    );
                    let h = ours(
                        "sub",
                        &["-p", &port, "-t", &topic, "-C", "1", "-F", f, "-V", v],
                    );
                    assert_eq!(
                        (h.code, h.err.lines().next()),
                        (m.code, m.err.lines().next()),
                        "{} {v} {f} {topic}",
                        b.name
                    );
                    // Compared as JSON values: the timestamp removed, and object keys in
                    // any order (mosquitto_sub prints properties in wire order, which is
                    // the broker's choice).
                    let parse = |s: &str| {
                        if s.trim().is_empty() {
                            // %J of a payload that is not JSON: both print only an error.
                            return serde_json::Value::Null;
                        }
                        let mut v: serde_json::Value =
                            serde_json::from_str(s.trim()).expect("JSON");
                        let tst = v.as_object_mut().and_then(|o| o.remove("tst"));
                        assert!(
                            tst.is_some_and(|t| t.as_str().is_some_and(|t| t.len() == 32)),
                            "{s}"
                        );
                        v
                    };
                    assert_eq!(parse(&h.out), parse(&m.out), "{} {v} {f} {topic}", b.name);
                }
            }
        }
    }
}

#[test]
fn remove_retained_and_stdin_lines() {
    for b in brokers() {
        let port = b.port.to_string();
        let t = format!("cli/{}/rm", b.name);
        retain(b.port, &format!("{t}/1"), "kept", &[]);
        // Ours clears it...
        let h = ours(
            "sub",
            &[
                "-p",
                &port,
                "-t",
                &format!("{t}/#"),
                "--remove-retained",
                "-C",
                "1",
                "-v",
            ],
        );
        assert_eq!(
            (h.out.as_str(), h.code),
            (format!("{t}/1 kept\n").as_str(), 0)
        );
        // ...as mosquitto_sub sees: nothing retained any more.
        let m = theirs(
            "sub",
            &["-p", &port, "-t", &format!("{t}/#"), "-W", "1", "-v"],
        );
        assert_eq!((m.out.as_str(), m.code), ("", 27), "{}", b.name);

        // pub -l: one message per line, read by mosquitto_sub.
        let lt = format!("cli/{}/lines", b.name);
        let (_, err, code) = run_with_stdin(
            halyard_bin(),
            &["pub", "-p", &port, "-t", &lt, "-l", "-r", "-q", "1"],
            Some(b"one\ntwo\nthree\n"),
        );
        assert_eq!(code, 0, "{err}");
        // The last line stays retained.
        let m = theirs("sub", &["-p", &port, "-t", &lt, "-C", "1"]);
        assert_eq!(m.out, "three\n", "{}", b.name);
        // -f file and -s stdin.
        let file = b.dir.join("payload.bin");
        std::fs::write(&file, b"from a file").expect("write");
        let (_, err, code) = run(
            halyard_bin(),
            &[
                "pub",
                "-p",
                &port,
                "-t",
                &lt,
                "-f",
                file.to_str().expect("utf8"),
                "-r",
            ],
        );
        assert_eq!(code, 0, "{err}");
        assert_eq!(
            theirs("sub", &["-p", &port, "-t", &lt, "-C", "1"]).out,
            "from a file\n"
        );
        let (_, err, code) = run_with_stdin(
            halyard_bin(),
            &["pub", "-p", &port, "-t", &lt, "-s", "-r"],
            Some(b"all of stdin"),
        );
        assert_eq!(code, 0, "{err}");
        assert_eq!(
            theirs("sub", &["-p", &port, "-t", &lt, "-C", "1"]).out,
            "all of stdin\n"
        );
    }
}

/// Same exit code and the same "Error: ..." line as mosquitto's tools (mosquitto also
/// prints its whole usage text on stdout; we point to --help instead).
#[test]
fn usage_errors_match() {
    for (tool, args) in [
        ("pub", &["-t", "a/#", "-m", "x"][..]),
        ("sub", &["-t", "a/#b"][..]),
        ("pub", &["-m", "x"][..]),
        ("sub", &[][..]),
        ("pub", &["-t", "a", "-m", "x", "-n"][..]),
        ("sub", &["-t", "a", "-c"][..]),
    ] {
        let m = theirs(tool, args);
        let h = ours(tool, args);
        let error_line = |s: &str| {
            s.lines()
                .find(|l| l.starts_with("Error"))
                .map(str::to_string)
        };
        assert_eq!(h.code, m.code, "{tool} {args:?}");
        assert_eq!(error_line(&h.err), error_line(&m.err), "{tool} {args:?}");
        assert!(error_line(&h.err).is_some(), "{tool} {args:?}: {}", h.err);
    }
}

/// `-L mqtt://user:pass@host:port/topic` as mosquitto reads it.
#[test]
fn url_form() {
    for b in brokers() {
        let t = format!("cli/{}/url", b.name);
        retain(b.port, &t, "via url", &[]);
        let url = format!("mqtt://alice:secret@127.0.0.1:{}/{t}", b.auth_port);
        let r = same("sub", &["-L", &url, "-C", "1"], "-L");
        assert_eq!(r.out, "via url\n");
    }
}

/// `sub -c` resumes a persistent session: the messages queued for it while it was away
/// arrive right after CONNACK, before the tool has subscribed again, and are printed (and
/// counted for `-C`) like any other, as mosquitto_sub does; against both brokers, 3.1.1
/// and 5.0. (They were acknowledged and dropped before.)
#[test]
fn sub_c_prints_what_a_persistent_session_queued() {
    for b in brokers() {
        let port = b.port.to_string();
        for v in ["mqttv311", "mqttv5"] {
            let id = format!("px-{}-{v}", b.name);
            let t = format!("off/{}/{v}", b.name);
            let filter = format!("{t}/#");
            let persistent = |extra: &[&str]| {
                let mut a = vec![
                    "-p",
                    port.as_str(),
                    "-i",
                    id.as_str(),
                    "-c",
                    "-q",
                    "1",
                    "-t",
                    filter.as_str(),
                    "-V",
                    v,
                ];
                if v == "mqttv5" {
                    a.extend_from_slice(&["-x", "3600"]);
                }
                a.extend_from_slice(extra);
                a.iter().map(|s| s.to_string()).collect::<Vec<_>>()
            };
            let args = persistent(&["-E"]);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let r = ours("sub", &args);
            assert_eq!(r.code, 0, "{}: subscribe: {}", b.name, r.err);
            for (sub, msg) in [("1", "q1"), ("2", "q2")] {
                let (_, err, code) = run(
                    "mosquitto_pub",
                    &[
                        "-p",
                        &port,
                        "-t",
                        &format!("{t}/{sub}"),
                        "-m",
                        msg,
                        "-q",
                        "1",
                        "-V",
                        v,
                    ],
                );
                assert_eq!(code, 0, "{err}");
            }
            let args = persistent(&["-C", "2", "-v", "-W", "10"]);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let r = ours("sub", &args);
            assert_eq!(r.code, 0, "{} {v}: {}", b.name, r.err);
            assert_eq!(r.out, format!("{t}/1 q1\n{t}/2 q2\n"), "{} {v}", b.name);
            let args = persistent(&["-C", "2", "-v", "-W", "1"]);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let m = theirs("sub", &args);
            assert_eq!(
                m.code, 27,
                "{} {v}: nothing left for mosquitto_sub: {}",
                b.name, m.out
            );
        }
    }
}

/// `bench` takes the connection flags of `pub`/`sub` and mosquitto_pub: `-h HOST` is the
/// host (help is `--help`), `-u`/`-P` the credentials; against both brokers' password
/// listeners (alice / secret), a wrong password fails.
#[test]
fn bench_takes_the_connection_flags_of_pub_and_sub() {
    for b in brokers() {
        let port = b.auth_port.to_string();
        let args = |pw: &str| {
            [
                "bench",
                "pub",
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-u",
                "alice",
                "-P",
                pw,
                "--pubs",
                "1",
                "-d",
                "1",
                "--json",
                "--quiet",
            ]
            .map(String::from)
        };
        let a = args("secret");
        let (out, err, code) = run(halyard_bin(), &a.each_ref().map(String::as_str));
        assert_eq!(code, 0, "{}: {err}", b.name);
        let v: serde_json::Value = serde_json::from_str(out.trim()).expect(&out);
        assert!(v["sent"].as_u64().unwrap() > 0, "{}: {out}", b.name);
        let a = args("wrong");
        let (_, _, code) = run(halyard_bin(), &a.each_ref().map(String::as_str));
        assert_ne!(code, 0, "{}: a wrong password fails", b.name);
    }
    let (out, _, code) = run(halyard_bin(), &["bench", "pub", "--help"]);
    assert_eq!(code, 0);
    assert!(out.contains("-h, --host <HOST>"), "{out}");
}
