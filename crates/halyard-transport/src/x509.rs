//! Just enough DER to name a client certificate: the subject's Common Name, else the first
//! Subject Alternative Name. The certificate has already been verified by rustls/webpki
//! when we read it; this reads two fields and never panics on any input (the tests feed
//! it every truncation and every single-byte corruption of a real certificate).

/// One TLV: tag, contents, and what follows.
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7F) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |a, &b| (a << 8) | b as usize);
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

fn expect(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (t, c, r) = tlv(input)?;
    (t == tag).then_some((c, r))
}

const OID_CN: &[u8] = &[0x55, 0x04, 0x03];
const OID_SAN: &[u8] = &[0x55, 0x1D, 0x11];

fn string_value(tag: u8, v: &[u8]) -> Option<String> {
    match tag {
        // UTF8String, PrintableString, IA5String, TeletexString (read as Latin-1 subset)
        0x0C | 0x13 | 0x16 => std::str::from_utf8(v).ok().map(str::to_owned),
        0x14 => Some(v.iter().map(|&b| b as char).collect()),
        // BMPString: UCS-2 big endian
        0x1E => {
            if !v.len().is_multiple_of(2) {
                return None;
            }
            let units: Vec<u16> = v
                .chunks(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]]))
                .collect();
            String::from_utf16(&units).ok()
        }
        _ => None,
    }
}

fn common_name(mut name: &[u8]) -> Option<String> {
    while !name.is_empty() {
        let (set, rest) = expect(name, 0x31)?;
        name = rest;
        let mut atvs = set;
        while !atvs.is_empty() {
            let (atv, r) = expect(atvs, 0x30)?;
            atvs = r;
            let (oid, value) = expect(atv, 0x06)?;
            if oid == OID_CN {
                let (t, v, _) = tlv(value)?;
                return string_value(t, v);
            }
        }
    }
    None
}

fn first_san(mut exts: &[u8]) -> Option<String> {
    while !exts.is_empty() {
        let (ext, r) = expect(exts, 0x30)?;
        exts = r;
        let (oid, mut rest) = expect(ext, 0x06)?;
        if oid != OID_SAN {
            continue;
        }
        if let Some((_, r)) = expect(rest, 0x01) {
            rest = r; // "critical"
        }
        let (octets, _) = expect(rest, 0x04)?;
        let (mut names, _) = expect(octets, 0x30)?;
        while !names.is_empty() {
            let (t, v, r) = tlv(names)?;
            names = r;
            match t {
                // rfc822Name, dNSName, uniformResourceIdentifier
                0x81 | 0x82 | 0x86 => return std::str::from_utf8(v).ok().map(str::to_owned),
                // iPAddress
                0x87 => {
                    return match v.len() {
                        4 => Some(std::net::Ipv4Addr::new(v[0], v[1], v[2], v[3]).to_string()),
                        16 => {
                            let mut b = [0u8; 16];
                            b.copy_from_slice(v);
                            Some(std::net::Ipv6Addr::from(b).to_string())
                        }
                        _ => None,
                    };
                }
                _ => {}
            }
        }
    }
    None
}

/// The identity of a DER certificate: subject CN, else first SAN (email, DNS, URI, IP).
pub(crate) fn identity(cert: &[u8]) -> Option<String> {
    let (cert, _) = expect(cert, 0x30)?;
    let (mut tbs, _) = expect(cert, 0x30)?;
    if let Some((_, r)) = expect(tbs, 0xA0) {
        tbs = r; // version
    }
    let (_, r) = expect(tbs, 0x02)?; // serial
    let (_, r) = expect(r, 0x30)?; // signature algorithm
    let (_, r) = expect(r, 0x30)?; // issuer
    let (_, r) = expect(r, 0x30)?; // validity
    let (subject, mut r) = expect(r, 0x30)?;
    if let Some(cn) = common_name(subject) {
        return Some(cn);
    }
    let (_, rest) = expect(r, 0x30)?; // subjectPublicKeyInfo
    r = rest;
    while !r.is_empty() {
        let (t, c, rest) = tlv(r)?;
        r = rest;
        if t == 0xA3 {
            let (exts, _) = expect(c, 0x30)?;
            return first_san(exts);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(cn: Option<&str>, sans: Vec<rcgen::SanType>) -> Vec<u8> {
        let mut p = rcgen::CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(cn) = cn {
            p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        }
        p.distinguished_name
            .push(rcgen::DnType::OrganizationName, "Halyard tests");
        p.subject_alt_names = sans;
        let key = rcgen::KeyPair::generate().unwrap();
        p.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn cn_first_then_san() {
        let dns = rcgen::SanType::DnsName("device-7.example".try_into().unwrap());
        assert_eq!(
            identity(&cert(Some("sensor-42"), vec![dns.clone()])).as_deref(),
            Some("sensor-42")
        );
        assert_eq!(
            identity(&cert(None, vec![dns])).as_deref(),
            Some("device-7.example")
        );
        let email = rcgen::SanType::Rfc822Name("ops@example.com".try_into().unwrap());
        assert_eq!(
            identity(&cert(None, vec![email])).as_deref(),
            Some("ops@example.com")
        );
        let ip = rcgen::SanType::IpAddress("10.1.2.3".parse().unwrap());
        assert_eq!(identity(&cert(None, vec![ip])).as_deref(), Some("10.1.2.3"));
        assert_eq!(identity(&cert(None, vec![])), None);
    }

    #[test]
    fn garbage_and_truncations_never_panic() {
        let c = cert(Some("x"), vec![]);
        for n in 0..c.len() {
            let _ = identity(&c[..n]);
        }
        let mut flipped = c;
        for i in 0..flipped.len() {
            flipped[i] ^= 0xFF;
            let _ = identity(&flipped);
            flipped[i] ^= 0xFF;
        }
        assert_eq!(identity(&[0x30, 0x84, 0xFF, 0xFF, 0xFF, 0xFF]), None);
    }
}
