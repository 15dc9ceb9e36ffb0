//! The ACL file, in mosquitto's format:
//!
//! ```text
//! # rules before the first `user` line apply to anonymous clients
//! topic read public/#
//! user alice
//! topic readwrite alice/#        # access: read, write, readwrite (default), deny
//! topic deny alice/secret
//! pattern write devices/%c/out   # every client; %c = client id, %u = user name
//! ```
//!
//! Once an ACL file is set, everything not granted is denied. A `deny` rule that matches
//! wins over any grant. `read` covers subscribing and receiving; a subscription filter is
//! granted only if every topic it can match is covered by one rule (`a/#` covers `a/+/b`,
//! `a/+` does not cover `a/#`). A `%c`/`%u` value containing `+`, `#` or `/` never matches,
//! so a client cannot widen a pattern by choosing its id; `%u` rules do not apply to
//! anonymous clients.

use halyard_broker::auth::{Access, Authorizer, Identity};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rights {
    Read,
    Write,
    ReadWrite,
    Deny,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    rights: Rights,
    filter: String,
}

/// A parsed ACL file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AclFile {
    anonymous: Vec<Rule>,
    users: std::collections::HashMap<String, Vec<Rule>>,
    patterns: Vec<Rule>,
}

fn valid_filter(f: &str) -> bool {
    if f.is_empty() {
        return false;
    }
    let levels: Vec<&str> = f.split('/').collect();
    levels.iter().enumerate().all(|(i, l)| match *l {
        "#" => i == levels.len() - 1,
        "+" => true,
        l => !l.contains('+') && !l.contains('#'),
    })
}

/// Whether topic name `topic` matches filter `filter`: the codec's matching (section 4.7,
/// `$`-topics not matched by a leading wildcard [MQTT-4.7.2-1]).
fn topic_matches(filter: &str, topic: &str) -> bool {
    halyard_codec::TopicFilter::try_from(filter).is_ok_and(|f| f.matches(topic))
}

/// Whether every topic that subscription filter `sub` can match also matches `acl`.
fn filter_within(acl: &str, sub: &str) -> bool {
    if sub.starts_with('$') != acl.starts_with('$')
        && (acl.starts_with('+') || acl.starts_with('#'))
    {
        return false;
    }
    let mut a = acl.split('/');
    let mut s = sub.split('/');
    loop {
        match (a.next(), s.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(x)) if x != "#" => {}
            (Some(x), Some(y)) if x == y && x != "+" && x != "#" => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

impl AclFile {
    /// Parses the text; `origin` names the file in errors (`origin:line: ...`).
    pub fn parse(text: &str, origin: &str) -> Result<AclFile, String> {
        let mut acl = AclFile::default();
        let mut current: Option<String> = None;
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let at = |why: String| format!("{origin}:{}: {why}", i + 1);
            let (kw, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
            let rest = rest.trim();
            match kw {
                "user" => {
                    if rest.is_empty() {
                        return Err(at("`user` needs a user name".into()));
                    }
                    acl.users.entry(rest.to_string()).or_default();
                    current = Some(rest.to_string());
                }
                "topic" | "pattern" => {
                    let (rights, filter) = match rest.split_once(char::is_whitespace) {
                        Some((r @ ("read" | "write" | "readwrite" | "deny"), f)) => {
                            let rights = match r {
                                "read" => Rights::Read,
                                "write" => Rights::Write,
                                "readwrite" => Rights::ReadWrite,
                                _ => Rights::Deny,
                            };
                            (rights, f.trim())
                        }
                        _ => (Rights::ReadWrite, rest),
                    };
                    if !valid_filter(filter) {
                        return Err(at(format!("`{filter}` is not a valid topic filter")));
                    }
                    let rule = Rule {
                        rights,
                        filter: filter.to_string(),
                    };
                    match (kw, &current) {
                        ("pattern", _) => acl.patterns.push(rule),
                        (_, None) => acl.anonymous.push(rule),
                        (_, Some(u)) => acl.users.entry(u.clone()).or_default().push(rule),
                    }
                }
                other => {
                    return Err(at(format!(
                        "unknown keyword `{other}` (expected user, topic or pattern)"
                    )));
                }
            }
        }
        Ok(acl)
    }

    /// Reads and parses `path`.
    pub fn load(path: &std::path::Path) -> Result<AclFile, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        AclFile::parse(&text, &path.display().to_string())
    }

    /// The rules that apply to `who`, patterns expanded.
    fn rules_for(&self, who: &Identity) -> Vec<Rule> {
        let own = match &who.username {
            None => &self.anonymous,
            Some(u) => match self.users.get(u.as_ref()) {
                Some(r) => r,
                None => &Vec::new() as &Vec<Rule>,
            },
        };
        let mut rules: Vec<Rule> = own.clone();
        let safe = |v: &str| !v.contains(['+', '#', '/']);
        for p in &self.patterns {
            if p.filter.contains("%u") && who.username.as_deref().is_none_or(|u| !safe(u)) {
                continue;
            }
            if p.filter.contains("%c") && !safe(&who.client_id) {
                continue;
            }
            let mut f = p.filter.replace("%c", &who.client_id);
            if let Some(u) = &who.username {
                f = f.replace("%u", u);
            }
            rules.push(Rule {
                rights: p.rights,
                filter: f,
            });
        }
        rules
    }
}

impl Authorizer for AclFile {
    fn check(&self, who: &Identity, access: Access, topic: &str) -> bool {
        let rules = self.rules_for(who);
        let covers = |r: &Rule| match access {
            Access::Subscribe => filter_within(&r.filter, topic),
            Access::Read | Access::Write => topic_matches(&r.filter, topic),
        };
        // A matching deny wins. For a subscription, a deny that overlaps only part of
        // the filter does not refuse it: those messages are withheld on delivery.
        let denied = rules.iter().any(|r| {
            r.rights == Rights::Deny
                && match access {
                    Access::Subscribe => filter_within(&r.filter, topic),
                    _ => topic_matches(&r.filter, topic),
                }
        });
        if denied {
            return false;
        }
        rules.iter().any(|r| {
            covers(r)
                && matches!(
                    (r.rights, access),
                    (Rights::ReadWrite, _)
                        | (Rights::Read, Access::Read | Access::Subscribe)
                        | (Rights::Write, Access::Write)
                )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn who(c: &str, u: Option<&str>) -> Identity {
        Identity {
            client_id: c.into(),
            username: u.map(Arc::from),
        }
    }

    const FILE: &str = "\
# anonymous
topic read public/#
user alice
topic alice/#
topic deny alice/secret
topic write shared/in
user bob
topic read alice/status
pattern write devices/%c/out
pattern read users/%u/#
";

    #[test]
    fn mosquitto_semantics() {
        let acl = AclFile::parse(FILE, "acl").unwrap();
        let anon = who("x", None);
        let alice = who("a1", Some("alice"));
        let bob = who("b1", Some("bob"));
        use Access::*;
        assert!(acl.check(&anon, Read, "public/news") && acl.check(&anon, Subscribe, "public/#"));
        assert!(!acl.check(&anon, Write, "public/news"), "read-only");
        assert!(
            !acl.check(&anon, Read, "alice/x"),
            "user rules are not anonymous rules"
        );
        assert!(acl.check(&alice, Write, "alice/a/b") && acl.check(&alice, Read, "alice/a"));
        assert!(
            !acl.check(&alice, Read, "alice/secret") && !acl.check(&alice, Write, "alice/secret")
        );
        assert!(acl.check(&alice, Write, "shared/in") && !acl.check(&alice, Read, "shared/in"));
        assert!(
            !acl.check(&alice, Read, "public/news"),
            "anonymous rules are not user rules"
        );
        assert!(acl.check(&bob, Read, "alice/status") && !acl.check(&bob, Read, "alice/other"));
        assert!(
            !acl.check(&who("z", Some("zed")), Read, "alice/status"),
            "unknown user: default deny"
        );
        // Patterns.
        assert!(
            acl.check(&bob, Write, "devices/b1/out") && !acl.check(&bob, Write, "devices/a1/out")
        );
        assert!(
            acl.check(&bob, Read, "users/bob/inbox") && !acl.check(&bob, Read, "users/alice/inbox")
        );
        assert!(
            !acl.check(&anon, Read, "users//inbox"),
            "%u never applies to anonymous clients"
        );
        assert!(
            !acl.check(&who("+", None), Write, "devices/+/out"),
            "a wildcard client id widens nothing"
        );
        // Subscriptions must be within a grant.
        assert!(
            acl.check(&alice, Subscribe, "alice/+/b") && acl.check(&alice, Subscribe, "alice/#")
        );
        assert!(!acl.check(&alice, Subscribe, "#") && !acl.check(&alice, Subscribe, "+/a"));
        assert!(
            !acl.check(&bob, Subscribe, "alice/+"),
            "alice/+ is wider than alice/status"
        );
        assert!(
            !acl.check(&alice, Subscribe, "alice/secret"),
            "exactly the denied topic"
        );
    }

    #[test]
    fn errors_name_file_and_line() {
        for (text, want) in [
            ("user\n", "acl:1: `user` needs a user name"),
            (
                "\ntopic read a/#/b\n",
                "acl:2: `a/#/b` is not a valid topic filter",
            ),
            ("topics read a\n", "acl:1: unknown keyword `topics`"),
        ] {
            let e = AclFile::parse(text, "acl").unwrap_err();
            assert!(e.starts_with(want), "{e}");
        }
    }

    #[test]
    fn matching_helpers() {
        assert!(topic_matches("a/+/c", "a/b/c") && !topic_matches("a/+", "a/b/c"));
        assert!(
            topic_matches("#", "a")
                && !topic_matches("#", "$SYS/x")
                && topic_matches("$SYS/#", "$SYS/x")
        );
        assert!(filter_within("a/#", "a/+/c") && filter_within("a/+/c", "a/b/c"));
        assert!(!filter_within("a/+", "a/#") && !filter_within("a/b", "a/+"));
        assert!(filter_within("#", "a/#") && !filter_within("#", "$SYS/#"));
    }
}
