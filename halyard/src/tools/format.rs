//! Message output for `halyard sub`, compatible with `mosquitto_sub`: the default and
//! verbose forms, and every `-F` specifier (`%t %p %x %X %l %m %q %r %j %J %I %U %C %D %E
//! %F %P %R %S %A %%`, width / `-` / `0` / precision, `@` strftime fields with `@N`
//! nanoseconds, and backslash escapes). Times are UTC (mosquitto prints local time; with
//! `TZ=UTC` the two agree).

use std::time::{SystemTime, UNIX_EPOCH};

use halyard_client::Message;

/// How to print messages.
#[derive(Debug, Clone)]
pub(crate) struct Output {
    pub format: Option<String>,
    pub verbose: bool,
    pub eol: bool,
    pub pretty: bool,
}

impl Output {
    /// Appends one message's output to `out`; `Err` carries an error line for stderr
    /// (invalid JSON payload for `%J`), the rest of the line is still printed.
    pub(crate) fn render(&self, m: &Message, now: SystemTime, out: &mut Vec<u8>) -> Option<String> {
        match &self.format {
            Some(f) => return formatted(f, m, now, self.pretty, self.eol, out),
            None if self.verbose => {
                if m.payload.is_empty() {
                    if self.eol {
                        out.extend_from_slice(m.topic.as_bytes());
                        out.extend_from_slice(b" (null)\n");
                    }
                } else {
                    out.extend_from_slice(m.topic.as_bytes());
                    out.push(b' ');
                    out.extend_from_slice(&m.payload);
                    if self.eol {
                        out.push(b'\n');
                    }
                }
            }
            None => {
                if !m.payload.is_empty() {
                    out.extend_from_slice(&m.payload);
                    if self.eol {
                        out.push(b'\n');
                    }
                }
            }
        }
        None
    }
}

struct Spec {
    left: bool,
    zero: bool,
    width: usize,
    precision: Option<usize>,
}

fn formatted(
    f: &str,
    m: &Message,
    now: SystemTime,
    pretty: bool,
    eol: bool,
    out: &mut Vec<u8>,
) -> Option<String> {
    let b = f.as_bytes();
    let mut err = None;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 1 < b.len() => {
                i += 1;
                let mut spec = Spec {
                    left: false,
                    zero: false,
                    width: 0,
                    precision: None,
                };
                if b[i] == b'-' && i + 1 < b.len() {
                    spec.left = true;
                    i += 1;
                }
                if b[i] == b'0' && i + 1 < b.len() {
                    spec.zero = true;
                    i += 1;
                }
                while i + 1 < b.len() && b[i].is_ascii_digit() {
                    spec.width = spec.width * 10 + usize::from(b[i] - b'0');
                    i += 1;
                }
                if b[i] == b'.' && i + 1 < b.len() {
                    i += 1;
                    let mut p = 0;
                    while i + 1 < b.len() && b[i].is_ascii_digit() {
                        p = p * 10 + usize::from(b[i] - b'0');
                        i += 1;
                    }
                    spec.precision = Some(p);
                }
                if let Some(e) = percent(b[i], &spec, m, now, pretty, out) {
                    err = Some(e);
                }
            }
            b'@' if i + 1 < b.len() => {
                i += 1;
                if b[i] == b'@' {
                    out.push(b'@');
                } else {
                    strftime_field(b[i], now, out);
                }
            }
            b'\\' if i + 1 < b.len() => {
                i += 1;
                match b[i] {
                    b'\\' => out.push(b'\\'),
                    b'0' => out.push(0),
                    b'a' => out.push(7),
                    b'e' => out.push(0x1b),
                    b'n' => out.push(b'\n'),
                    b'r' => out.push(b'\r'),
                    b't' => out.push(b'\t'),
                    b'v' => out.push(0x0b),
                    _ => {}
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    if eol {
        out.push(b'\n');
    }
    err
}

fn pad(out: &mut Vec<u8>, n: usize, c: u8) {
    out.extend(std::iter::repeat_n(c, n));
}

fn int(v: i64, s: &Spec, out: &mut Vec<u8>) {
    let text = v.to_string();
    if text.len() >= s.width {
        out.extend_from_slice(text.as_bytes());
    } else if s.left {
        out.extend_from_slice(text.as_bytes());
        pad(out, s.width - text.len(), b' ');
    } else {
        pad(out, s.width - text.len(), if s.zero { b'0' } else { b' ' });
        out.extend_from_slice(text.as_bytes());
    }
}

fn blank(s: &Spec, out: &mut Vec<u8>, zero_ok: bool) {
    pad(out, s.width, if zero_ok && s.zero { b'0' } else { b' ' });
}

fn string(v: &[u8], s: &Spec, out: &mut Vec<u8>) {
    let v = match s.precision {
        Some(p) if p < v.len() => &v[..p],
        _ => v,
    };
    if v.len() >= s.width {
        out.extend_from_slice(v);
    } else if s.left {
        out.extend_from_slice(v);
        pad(out, s.width - v.len(), b' ');
    } else {
        pad(out, s.width - v.len(), b' ');
        out.extend_from_slice(v);
    }
}

/// `%p`, `%x`, `%X` as mosquitto's write_payload: a width truncates as well as pads.
fn payload(p: &[u8], hex: u8, s: &Spec, out: &mut Vec<u8>) {
    let mut len = p.len();
    let padlen;
    if s.width > 0 {
        len = len.min(s.width);
        if hex > 0 {
            len /= 2;
            padlen = s.width.saturating_sub(len * 2);
        } else {
            padlen = s.width.saturating_sub(len);
        }
    } else {
        padlen = 0;
    }
    if !s.left {
        pad(out, padlen, if s.zero { b'0' } else { b' ' });
    }
    for &byte in &p[..len] {
        match hex {
            0 => out.push(byte),
            1 => out.extend_from_slice(format!("{byte:02x}").as_bytes()),
            _ => out.extend_from_slice(format!("{byte:02X}").as_bytes()),
        }
    }
    if s.left {
        pad(out, padlen, b' ');
    }
}

fn percent(
    c: u8,
    s: &Spec,
    m: &Message,
    now: SystemTime,
    pretty: bool,
    out: &mut Vec<u8>,
) -> Option<String> {
    let props = &m.properties;
    match c {
        b'%' => out.push(b'%'),
        // The client resolves topic aliases; the alias itself is not kept.
        b'A' => blank(s, out, true),
        b'C' => match &props.content_type {
            Some(ct) => string(ct.as_bytes(), s, out),
            None => blank(s, out, false),
        },
        b'D' => {
            if let Some(cd) = &props.correlation_data {
                out.extend_from_slice(cd);
            }
        }
        b'E' => match props.message_expiry_interval {
            Some(e) => int(i64::from(e), s, out),
            None => blank(s, out, true),
        },
        b'F' => match props.payload_format_indicator {
            Some(f) => int(i64::from(f), s, out),
            None => blank(s, out, true),
        },
        b'I' => {
            let t = Utc::from(now);
            let text = format!(
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}+0000",
                t.year, t.month, t.day, t.hour, t.minute, t.second
            );
            string(text.as_bytes(), s, out);
        }
        b'j' => json(m, now, true, pretty, out),
        b'J' => {
            if m.payload.is_empty()
                || serde_json::from_slice::<serde_json::Value>(&m.payload).is_ok()
            {
                json(m, now, false, pretty, out);
            } else {
                return Some(format!(
                    "Error: Message payload is not valid JSON on topic {}.",
                    m.topic
                ));
            }
        }
        b'l' => int(m.payload.len() as i64, s, out),
        b'm' => int(i64::from(m.packet_id), s, out),
        b'P' => {
            let pairs: Vec<String> = props
                .user_properties
                .iter()
                .map(|(k, v)| format!("{k}:{v}"))
                .collect();
            out.extend_from_slice(pairs.join(" ").as_bytes());
        }
        b'p' => payload(&m.payload, 0, s, out),
        b'q' => out.push(b'0' + m.qos as u8),
        b'R' => {
            if let Some(rt) = &props.response_topic {
                string(rt.as_str().as_bytes(), s, out);
            }
        }
        b'r' => out.push(if m.retain { b'1' } else { b'0' }),
        b'S' => match props.subscription_identifiers.first() {
            Some(id) => int(i64::from(*id), s, out),
            None => blank(s, out, true),
        },
        b't' => string(m.topic.as_bytes(), s, out),
        b'U' => {
            let d = now.duration_since(UNIX_EPOCH).unwrap_or_default();
            out.extend_from_slice(format!("{}.{:09}", d.as_secs(), d.subsec_nanos()).as_bytes());
        }
        b'x' => payload(&m.payload, 1, s, out),
        b'X' => payload(&m.payload, 2, s, out),
        _ => {}
    }
    None
}

/// `%j` / `%J`: the object mosquitto_sub prints (cJSON build): tst, topic, qos, retain,
/// payloadlen, mid (QoS > 0), properties (v5, when present), payload.
fn json(m: &Message, now: SystemTime, escaped: bool, pretty: bool, out: &mut Vec<u8>) {
    use serde_json::{Map, Value};
    let t = Utc::from(now);
    let d = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let tst = format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z+0000",
        t.year,
        t.month,
        t.day,
        t.hour,
        t.minute,
        t.second,
        d.subsec_micros()
    );
    let mut o = Map::new();
    o.insert("tst".into(), Value::String(tst));
    o.insert("topic".into(), Value::String(m.topic.to_string()));
    o.insert("qos".into(), Value::from(m.qos as u8));
    o.insert("retain".into(), Value::from(u8::from(m.retain)));
    o.insert("payloadlen".into(), Value::from(m.payload.len()));
    if m.qos as u8 > 0 {
        o.insert("mid".into(), Value::from(m.packet_id));
    }
    let p = &m.properties;
    let mut props = Map::new();
    if !p.user_properties.is_empty() {
        let mut up = Map::new();
        for (k, v) in &p.user_properties {
            up.insert(k.to_string(), Value::String(v.to_string()));
        }
        props.insert("user-properties".into(), Value::Object(up));
    }
    if let Some(ct) = &p.content_type {
        props.insert("content-type".into(), Value::String(ct.to_string()));
    }
    if let Some(cd) = &p.correlation_data {
        props.insert(
            "correlation-data".into(),
            Value::String(String::from_utf8_lossy(cd).into()),
        );
    }
    if let Some(rt) = &p.response_topic {
        props.insert("response-topic".into(), Value::String(rt.as_str().into()));
    }
    if let Some(f) = p.payload_format_indicator {
        props.insert("payload-format-indicator".into(), Value::from(u8::from(f)));
    }
    if let Some(e) = p.message_expiry_interval {
        props.insert("message-expiry-interval".into(), Value::from(e));
    }
    if let Some(id) = p.subscription_identifiers.first() {
        props.insert("subscription-identifier".into(), Value::from(*id));
    }
    if !props.is_empty() {
        o.insert("properties".into(), Value::Object(props));
    }
    let payload = if m.payload.is_empty() {
        Value::Null
    } else if escaped {
        match std::str::from_utf8(&m.payload) {
            Ok(s) => Value::String(s.into()),
            Err(_) => Value::Array(m.payload.iter().map(|b| Value::from(*b)).collect()),
        }
    } else {
        serde_json::from_slice(&m.payload).unwrap_or(Value::Null)
    };
    o.insert("payload".into(), payload);
    let v = Value::Object(o);
    if pretty {
        cjson_pretty(&v, 0, out);
    } else {
        out.extend_from_slice(v.to_string().as_bytes());
    }
}

/// cJSON_Print's layout: tabs for indentation, a tab after each key's colon, arrays on
/// one line with ", " between items.
fn cjson_pretty(v: &serde_json::Value, depth: usize, out: &mut Vec<u8>) {
    use serde_json::Value;
    match v {
        Value::Object(map) if !map.is_empty() => {
            out.extend_from_slice(b"{\n");
            let n = map.len();
            for (i, (k, val)) in map.iter().enumerate() {
                pad(out, depth + 1, b'\t');
                out.extend_from_slice(Value::String(k.clone()).to_string().as_bytes());
                out.extend_from_slice(b":\t");
                cjson_pretty(val, depth + 1, out);
                if i + 1 < n {
                    out.push(b',');
                }
                out.push(b'\n');
            }
            pad(out, depth, b'\t');
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.extend_from_slice(b", ");
                }
                cjson_pretty(item, depth, out);
            }
            out.push(b']');
        }
        other => out.extend_from_slice(other.to_string().as_bytes()),
    }
}

/// A UTC civil time.
struct Utc {
    year: i64,
    month: u32,
    day: u32,
    hour: u64,
    minute: u64,
    second: u64,
    weekday: usize,
    yday: u32,
}

impl From<SystemTime> for Utc {
    fn from(t: SystemTime) -> Utc {
        let secs = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let days = (secs / 86_400) as i64;
        let rem = secs % 86_400;
        // Howard Hinnant's civil_from_days.
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let year = yoe + era * 400 + i64::from(month <= 2);
        let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
        const CUM: [u32; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
        let yday = CUM[(month - 1) as usize] + day + u32::from(leap && month > 2);
        Utc {
            year,
            month,
            day,
            hour: rem / 3600,
            minute: rem % 3600 / 60,
            second: rem % 60,
            // 1970-01-01 was a Thursday.
            weekday: (days + 4).rem_euclid(7) as usize,
            yday,
        }
    }
}

const DAYS: [&str; 7] = [
    "Sunday",
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
];
const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// One strftime conversion (`@Y` is `%Y`), plus `@N` for nanoseconds.
fn strftime_field(c: u8, now: SystemTime, out: &mut Vec<u8>) {
    let t = Utc::from(now);
    let d = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let s = match c {
        b'Y' => format!("{:04}", t.year),
        b'y' => format!("{:02}", t.year.rem_euclid(100)),
        b'C' => format!("{:02}", t.year / 100),
        b'm' => format!("{:02}", t.month),
        b'd' => format!("{:02}", t.day),
        b'e' => format!("{:2}", t.day),
        b'H' => format!("{:02}", t.hour),
        b'I' => format!("{:02}", if t.hour % 12 == 0 { 12 } else { t.hour % 12 }),
        b'M' => format!("{:02}", t.minute),
        b'S' => format!("{:02}", t.second),
        b'p' => (if t.hour < 12 { "AM" } else { "PM" }).to_string(),
        b'j' => format!("{:03}", t.yday),
        b'a' => DAYS[t.weekday][..3].to_string(),
        b'A' => DAYS[t.weekday].to_string(),
        b'b' | b'h' => MONTHS[(t.month - 1) as usize][..3].to_string(),
        b'B' => MONTHS[(t.month - 1) as usize].to_string(),
        b'u' => format!("{}", if t.weekday == 0 { 7 } else { t.weekday }),
        b'w' => format!("{}", t.weekday),
        b'F' => format!("{:04}-{:02}-{:02}", t.year, t.month, t.day),
        b'T' => format!("{:02}:{:02}:{:02}", t.hour, t.minute, t.second),
        b'D' => format!("{:02}/{:02}/{:02}", t.month, t.day, t.year.rem_euclid(100)),
        b'R' => format!("{:02}:{:02}", t.hour, t.minute),
        b's' => d.as_secs().to_string(),
        b'N' => format!("{:09}", d.subsec_nanos()),
        b'z' => "+0000".to_string(),
        b'Z' => "UTC".to_string(),
        b'n' => "\n".to_string(),
        b't' => "\t".to_string(),
        b'%' => "%".to_string(),
        _ => String::new(),
    };
    out.extend_from_slice(s.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use halyard_client::{Bytes, QoS};
    use std::time::Duration;

    fn at(secs: u64, nanos: u32) -> SystemTime {
        UNIX_EPOCH + Duration::new(secs, nanos)
    }

    fn render(f: &str, m: &Message, now: SystemTime) -> String {
        let o = Output {
            format: Some(f.into()),
            verbose: false,
            eol: false,
            pretty: false,
        };
        let mut out = Vec::new();
        o.render(m, now, &mut out);
        String::from_utf8(out).expect("utf8")
    }

    #[test]
    fn civil_time_matches_known_dates() {
        // 2026-11-22T04:00:50Z (a Sunday), checked against `date -u -d @1795320050`.
        let t = Utc::from(at(1_795_320_050, 0));
        assert_eq!(
            (t.year, t.month, t.day, t.hour, t.minute, t.second),
            (2026, 11, 22, 4, 0, 50)
        );
        assert_eq!(DAYS[t.weekday], "Sunday");
        assert_eq!(t.yday, 326);
        // Leap day.
        let t = Utc::from(at(951_782_400, 0));
        assert_eq!((t.year, t.month, t.day), (2000, 2, 29));
    }

    /// Expected strings below were produced by mosquitto_sub 2.0.11 (`TZ=UTC`) for the
    /// same message; see tests/interop/cli.sh for the live comparison.
    #[test]
    fn specifiers_match_mosquitto_sub() {
        let mut m = Message::new("f/1", Bytes::from_static(b"he\"llo"));
        m.properties.content_type = Some("text/x".into());
        m.properties.correlation_data = Some(Bytes::from_static(b"cd1"));
        m.properties.message_expiry_interval = Some(30);
        m.properties.payload_format_indicator = Some(true);
        m.properties.user_properties.push(("a".into(), "b".into()));
        m.properties.response_topic = Some(halyard_codec::TopicName::new("rt/1").expect("topic"));
        let got = render(
            "%t|%p|%x|%X|%l|%m|%q|%r|%C|%D|%E|%F|%P|%R|%S|%A|%10t|%-10t|%.2t|%5l|%05l|%-5l|@Y-@m|%%|\\t|",
            &m,
            at(1_795_320_050, 646_782_146),
        );
        assert_eq!(
            got,
            "f/1|he\"llo|6865226c6c6f|6865226C6C6F|6|0|0|0|text/x|cd1|30|1|a:b|rt/1|||       f/1|f/1       |f/|    6|00006|6    |2026-11|%|\t|"
        );
        assert_eq!(
            render(
                "%I %U @s @N @H:@M:@S @z @Z @a @b",
                &m,
                at(1_795_320_050, 646_782_146)
            ),
            "2026-11-22T04:00:50+0000 1795320050.646782146 1795320050 646782146 04:00:50 +0000 UTC Sun Nov"
        );
    }

    #[test]
    fn json_matches_mosquitto_sub() {
        let mut m = Message::new("f/4", Bytes::new());
        assert_eq!(
            render("%j", &m, at(1_795_320_050, 340_062_000)),
            r#"{"tst":"2026-11-22T04:00:50.340062Z+0000","topic":"f/4","qos":0,"retain":0,"payloadlen":0,"payload":null}"#
        );
        m.payload = Bytes::from_static(b"\x01\x02");
        assert_eq!(
            render("%j", &m, at(1_795_320_049, 420_741_000)),
            r#"{"tst":"2026-11-22T04:00:49.420741Z+0000","topic":"f/4","qos":0,"retain":0,"payloadlen":2,"payload":"\u0001\u0002"}"#
        );
        m.payload = Bytes::from_static(br#"{"a":[1,2]}"#);
        m.qos = QoS::AtLeastOnce;
        m.packet_id = 7;
        assert_eq!(
            render("%J", &m, at(1_795_320_048, 805_568_000)),
            r#"{"tst":"2026-11-22T04:00:48.805568Z+0000","topic":"f/4","qos":1,"retain":0,"payloadlen":11,"mid":7,"payload":{"a":[1,2]}}"#
        );
        let o = Output {
            format: Some("%J".into()),
            verbose: false,
            eol: false,
            pretty: true,
        };
        m.qos = QoS::AtMostOnce;
        let mut out = Vec::new();
        o.render(&m, at(1_795_320_049, 113_386_000), &mut out);
        assert_eq!(
            String::from_utf8(out).expect("utf8"),
            "{\n\t\"tst\":\t\"2026-11-22T04:00:49.113386Z+0000\",\n\t\"topic\":\t\"f/4\",\n\t\"qos\":\t0,\n\t\"retain\":\t0,\n\t\"payloadlen\":\t11,\n\t\"payload\":\t{\n\t\t\"a\":\t[1, 2]\n\t}\n}"
        );
        m.payload = Bytes::from_static(b"not json");
        let mut out = Vec::new();
        let err = o.render(&m, at(0, 0), &mut out);
        assert_eq!(
            err.as_deref(),
            Some("Error: Message payload is not valid JSON on topic f/4.")
        );
    }

    #[test]
    fn default_and_verbose_forms() {
        let mut m = Message::new("v/1", Bytes::from_static(b"hi"));
        let mut o = Output {
            format: None,
            verbose: false,
            eol: true,
            pretty: false,
        };
        let mut out = Vec::new();
        o.render(&m, at(0, 0), &mut out);
        assert_eq!(out, b"hi\n");
        o.verbose = true;
        out.clear();
        o.render(&m, at(0, 0), &mut out);
        assert_eq!(out, b"v/1 hi\n");
        m.payload = Bytes::new();
        out.clear();
        o.render(&m, at(0, 0), &mut out);
        assert_eq!(out, b"v/1 (null)\n");
        o.verbose = false;
        out.clear();
        o.render(&m, at(0, 0), &mut out);
        assert!(out.is_empty(), "an empty payload prints nothing");
    }
}
