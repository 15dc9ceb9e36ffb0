//! Validated newtypes for topic names, topic filters and client identifiers: the rules of
//! sections 4.7 and 4.8 are checked once, when the value is built, and never again.

use std::fmt;

use bytestring::ByteString;

use crate::error::{DecodeError, ErrorKind};

/// Why a string is not a valid topic name or filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicError {
    /// Zero length [MQTT-4.7.3-1].
    Empty,
    /// A topic name containing `+` or `#` [MQTT-3.3.2-2].
    WildcardInName,
    /// `#` not alone in its level or not in the last level [MQTT-4.7.1-1].
    MultiLevelWildcard,
    /// `+` not alone in its level [MQTT-4.7.1-2].
    SingleLevelWildcard,
    /// `$share/` with an empty share name, or one containing `/`, `+` or `#` [MQTT-4.8.2-2].
    ShareName,
    /// `$share/{name}` not followed by `/` and a non-empty filter [MQTT-4.8.2-1].
    ShareFilter,
    /// The null character [MQTT-1.5.4-2].
    Null,
    /// Longer than 65,535 bytes [MQTT-4.7.3-3].
    TooLong,
}

impl TopicError {
    /// The normative statement this breaks.
    pub const fn rule(self) -> &'static str {
        match self {
            TopicError::Empty => "MQTT-4.7.3-1",
            TopicError::WildcardInName => "MQTT-3.3.2-2",
            TopicError::MultiLevelWildcard => "MQTT-4.7.1-1",
            TopicError::SingleLevelWildcard => "MQTT-4.7.1-2",
            TopicError::ShareName => "MQTT-4.8.2-2",
            TopicError::ShareFilter => "MQTT-4.8.2-1",
            TopicError::Null => "MQTT-1.5.4-2",
            TopicError::TooLong => "MQTT-4.7.3-3",
        }
    }
    fn detail(self) -> &'static str {
        match self {
            TopicError::Empty => "topic is empty",
            TopicError::WildcardInName => "topic name contains a wildcard character",
            TopicError::MultiLevelWildcard => "'#' must be alone in the last level",
            TopicError::SingleLevelWildcard => "'+' must be alone in its level",
            TopicError::ShareName => "shared subscription name is empty or has '/', '+' or '#'",
            TopicError::ShareFilter => "shared subscription has no topic filter",
            TopicError::Null => "topic contains U+0000",
            TopicError::TooLong => "topic is longer than 65535 bytes",
        }
    }
    /// The decode error for this topic problem. A topic filter that breaks the wildcard
    /// grammar cannot be parsed (malformed); a name with wildcards or an empty topic is data
    /// the protocol does not allow (protocol error).
    pub(crate) fn into_decode_error(self) -> DecodeError {
        let kind = match self {
            TopicError::Empty | TopicError::WildcardInName => ErrorKind::Protocol,
            _ => ErrorKind::Malformed,
        };
        DecodeError::new(kind, self.rule(), self.detail())
    }
}

impl fmt::Display for TopicError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} [{}]", self.detail(), self.rule())
    }
}

impl std::error::Error for TopicError {}

fn check_common(s: &str) -> Result<(), TopicError> {
    if s.is_empty() {
        return Err(TopicError::Empty);
    }
    if s.len() > usize::from(u16::MAX) {
        return Err(TopicError::TooLong);
    }
    if s.as_bytes().contains(&0) {
        return Err(TopicError::Null);
    }
    Ok(())
}

/// A topic name as carried by PUBLISH and wills: no wildcards, not empty.
///
/// The one exception is [`TopicName::empty`], which only a v5 PUBLISH that carries a Topic
/// Alias may hold until the receiver resolves the alias [MQTT-3.3.2-1].
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicName(ByteString);

impl TopicName {
    /// Validates a topic name.
    pub fn new(s: impl Into<ByteString>) -> Result<Self, TopicError> {
        let s = s.into();
        check_common(&s)?;
        if s.bytes().any(|b| b == b'+' || b == b'#') {
            return Err(TopicError::WildcardInName);
        }
        Ok(TopicName(s))
    }
    /// This topic and `payload`, copied together into one new buffer. What the decoder
    /// returns are slices of the read buffer: a message kept for long (queued for an
    /// offline client, retained, in flight) would pin the whole buffer, up to its 64 KiB,
    /// for a few bytes of its own.
    pub fn copy_with(&self, payload: &[u8]) -> (TopicName, bytes::Bytes) {
        let topic = self.0.as_bytes();
        let mut buf = bytes::BytesMut::with_capacity(topic.len() + payload.len());
        buf.extend_from_slice(topic);
        buf.extend_from_slice(payload);
        let payload = buf.split_off(topic.len()).freeze();
        // The bytes are those of a valid topic, so this cannot fail; keep the original
        // rather than panic if it ever did.
        let topic = ByteString::try_from(buf.freeze()).map_or_else(|_| self.clone(), TopicName);
        (topic, payload)
    }
    /// An owned copy of a topic the decoder has already validated.
    pub(crate) fn from_valid(s: &str) -> Self {
        TopicName(ByteString::from(s.to_owned()))
    }
    /// The zero-length topic of a PUBLISH that uses a Topic Alias.
    pub const fn empty() -> Self {
        TopicName(ByteString::from_static(""))
    }
    /// The topic as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// The underlying shared string (cheap to clone).
    pub fn as_bytestring(&self) -> &ByteString {
        &self.0
    }
    /// True only for [`TopicName::empty`].
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// Topics starting with `$` are not matched by filters starting with a wildcard
    /// [MQTT-4.7.2-1].
    pub fn is_system(&self) -> bool {
        self.0.starts_with('$')
    }
}

impl fmt::Debug for TopicName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for TopicName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<&str> for TopicName {
    type Error = TopicError;
    fn try_from(s: &str) -> Result<Self, TopicError> {
        TopicName::new(ByteString::from(s))
    }
}

/// A topic filter as carried by SUBSCRIBE and UNSUBSCRIBE, including shared subscriptions
/// (`$share/{ShareName}/{filter}`, section 4.8.2).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct TopicFilter {
    full: ByteString,
    /// Byte offset of the filter proper within `full` (0 unless shared).
    filter_start: u16,
}

const SHARE_PREFIX: &str = "$share/";

impl TopicFilter {
    /// The same filter in a buffer of its own: a decoded filter is a slice of the read
    /// buffer, which a subscription kept for the session's life would pin.
    pub fn copied(&self) -> TopicFilter {
        TopicFilter {
            full: ByteString::from(&*self.full),
            filter_start: self.filter_start,
        }
    }

    /// Validates a topic filter.
    pub fn new(s: impl Into<ByteString>) -> Result<Self, TopicError> {
        let full = s.into();
        check_common(&full)?;
        let mut filter_start = 0;
        if let Some(rest) = full.strip_prefix(SHARE_PREFIX) {
            let Some(slash) = rest.find('/') else {
                // "$share/name" with no filter at all.
                return Err(if rest.is_empty() || rest.contains(['+', '#']) {
                    TopicError::ShareName
                } else {
                    TopicError::ShareFilter
                });
            };
            let group = &rest[..slash];
            if group.is_empty() || group.contains(['+', '#']) {
                return Err(TopicError::ShareName);
            }
            if slash + 1 == rest.len() {
                return Err(TopicError::ShareFilter);
            }
            // The prefix and name fit in u16 because the whole string does.
            filter_start = (SHARE_PREFIX.len() + slash + 1) as u16;
        }
        check_wildcards(&full[usize::from(filter_start)..])?;
        Ok(TopicFilter { full, filter_start })
    }
    /// The whole filter as received, `$share/...` included.
    pub fn as_str(&self) -> &str {
        &self.full
    }
    /// The filter that topics are matched against (without any `$share/{name}/`).
    pub fn filter(&self) -> &str {
        &self.full[usize::from(self.filter_start)..]
    }
    /// The share name of a shared subscription.
    pub fn share_name(&self) -> Option<&str> {
        (self.filter_start > 0)
            .then(|| &self.full[SHARE_PREFIX.len()..usize::from(self.filter_start) - 1])
    }
    /// True for `$share/...` filters.
    pub fn is_shared(&self) -> bool {
        self.filter_start > 0
    }
    /// True when the filter proper contains `+` or `#`.
    pub fn has_wildcards(&self) -> bool {
        self.filter().contains(['+', '#'])
    }
    /// Whether `topic` matches this filter (section 4.7), including the rule that a leading
    /// wildcard does not match a topic starting with `$` [MQTT-4.7.2-1].
    pub fn matches(&self, topic: &str) -> bool {
        let filter = self.filter();
        if topic.starts_with('$') && filter.starts_with(['+', '#']) {
            return false;
        }
        let mut f = filter.split('/');
        let mut t = topic.split('/');
        loop {
            match (f.next(), t.next()) {
                (Some("#"), _) => return true,
                (Some("+"), Some(_)) => {}
                (Some(fl), Some(tl)) if fl == tl => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }
}

fn check_wildcards(filter: &str) -> Result<(), TopicError> {
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        if level.contains('#') && (level != "#" || levels.peek().is_some()) {
            return Err(TopicError::MultiLevelWildcard);
        }
        if level.contains('+') && level != "+" {
            return Err(TopicError::SingleLevelWildcard);
        }
    }
    Ok(())
}

impl fmt::Debug for TopicFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for TopicFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl TryFrom<&str> for TopicFilter {
    type Error = TopicError;
    fn try_from(s: &str) -> Result<Self, TopicError> {
        TopicFilter::new(ByteString::from(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `part` lies inside `whole`'s memory.
    fn inside(part: &[u8], whole: &[u8]) -> bool {
        let r = whole.as_ptr_range();
        r.contains(&part.as_ptr())
    }

    #[test]
    fn copies_do_not_share_the_decoded_buffer() {
        let wire = bytes::Bytes::from_static(b"$share/g/a/+xyz/t/payload");
        let filter = TopicFilter::new(ByteString::try_from(wire.slice(..12)).unwrap()).unwrap();
        let copy = filter.copied();
        assert_eq!(copy, filter);
        assert_eq!(copy.filter(), "a/+");
        assert!(!inside(copy.as_str().as_bytes(), &wire));

        let topic = TopicName::new(ByteString::try_from(wire.slice(14..17)).unwrap()).unwrap();
        let (t, payload) = topic.copy_with(&wire[18..]);
        assert_eq!((t.as_str(), &payload[..]), ("z/t", &b"payload"[..]));
        assert!(!inside(t.as_str().as_bytes(), &wire) && !inside(&payload, &wire));
    }

    #[test]
    fn filter_grammar_mqtt_4_7_1() {
        for ok in [
            "#",
            "+",
            "a/#",
            "a/+/b",
            "+/+",
            "/",
            "a//b",
            "$SYS/#",
            "sport/tennis/#",
        ] {
            assert!(TopicFilter::try_from(ok).is_ok(), "{ok}");
        }
        for (bad, err) in [
            ("a#", TopicError::MultiLevelWildcard),
            ("a/#/b", TopicError::MultiLevelWildcard),
            ("a/b#", TopicError::MultiLevelWildcard),
            ("a+", TopicError::SingleLevelWildcard),
            ("a/+b/c", TopicError::SingleLevelWildcard),
            ("", TopicError::Empty),
            ("a\0b", TopicError::Null),
        ] {
            assert_eq!(TopicFilter::try_from(bad).unwrap_err(), err, "{bad}");
        }
    }

    #[test]
    fn shared_subscription_mqtt_4_8_2() {
        let f = TopicFilter::try_from("$share/g1/a/+/c").unwrap();
        assert_eq!(f.share_name(), Some("g1"));
        assert_eq!(f.filter(), "a/+/c");
        assert!(f.is_shared());
        assert_eq!(
            TopicFilter::try_from("$share/g").unwrap_err(),
            TopicError::ShareFilter
        );
        assert_eq!(
            TopicFilter::try_from("$share/g/").unwrap_err(),
            TopicError::ShareFilter
        );
        assert_eq!(
            TopicFilter::try_from("$share//a").unwrap_err(),
            TopicError::ShareName
        );
        assert_eq!(
            TopicFilter::try_from("$share/+/a").unwrap_err(),
            TopicError::ShareName
        );
        assert_eq!(
            TopicFilter::try_from("$share/").unwrap_err(),
            TopicError::ShareName
        );
        assert_eq!(
            TopicFilter::try_from("$share/g/a#").unwrap_err(),
            TopicError::MultiLevelWildcard
        );
        // Not a share prefix: ordinary filters.
        assert!(!TopicFilter::try_from("$sharex/g/a").unwrap().is_shared());
    }

    #[test]
    fn matching_mqtt_4_7() {
        let m = |f: &str, t: &str| TopicFilter::try_from(f).unwrap().matches(t);
        assert!(m("sport/tennis/player1/#", "sport/tennis/player1"));
        assert!(m("sport/tennis/player1/#", "sport/tennis/player1/ranking"));
        assert!(m("sport/#", "sport"));
        assert!(m("#", "a/b/c"));
        assert!(m("sport/+", "sport/"));
        assert!(!m("sport/+", "sport"));
        assert!(m("+/+", "/finance"));
        assert!(m("/+", "/finance"));
        assert!(!m("+", "/finance"));
        assert!(!m("#", "$SYS/uptime")); // [MQTT-4.7.2-1]
        assert!(!m("+/monitor/Clients", "$SYS/monitor/Clients"));
        assert!(m("$SYS/#", "$SYS/monitor/Clients"));
        assert!(m("$share/g/a/+", "a/b"));
    }

    #[test]
    fn topic_name_rules() {
        assert!(TopicName::try_from("a/b").is_ok());
        assert!(TopicName::try_from("/").is_ok());
        assert_eq!(
            TopicName::try_from("a/+").unwrap_err(),
            TopicError::WildcardInName
        );
        assert_eq!(
            TopicName::try_from("#").unwrap_err(),
            TopicError::WildcardInName
        );
        assert_eq!(TopicName::try_from("").unwrap_err(), TopicError::Empty);
        let long = "a".repeat(65_536);
        assert_eq!(
            TopicName::try_from(long.as_str()).unwrap_err(),
            TopicError::TooLong
        );
    }
}
