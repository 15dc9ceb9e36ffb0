//! PROXY protocol v1 (text) and v2 (binary) headers, as sent by HAProxy, nginx, AWS NLB
//! and others in front of the broker, so the real client address reaches logs and
//! authentication. Only read on listeners that opt in: on any other listener a PROXY
//! header would let a client forge its address.
//!
//! Spec: <https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt>.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::{AsyncRead, AsyncReadExt};

/// v1's longest header, CRLF included (spec section 2.1).
pub const V1_MAX: usize = 107;
/// The v2 signature.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The longest v2 address block (with TLVs) we accept.
pub const V2_MAX_BODY: usize = 4096;

/// What a PROXY header says about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyHeader {
    /// The proxy's own connection (v2 LOCAL, health checks) or an address family we do not
    /// use (v1 UNKNOWN, v2 UNSPEC/UNIX/UDP): keep the socket's own addresses.
    Local,
    /// The original client (`source`) and the address it connected to (`destination`).
    Proxied {
        source: SocketAddr,
        destination: SocketAddr,
    },
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("PROXY protocol: {}", msg.into()),
    )
}

/// Parses a header at the start of `buf`: `Ok(None)` when more bytes are needed, else the
/// header and how many bytes it took.
pub fn parse(buf: &[u8]) -> io::Result<Option<(ProxyHeader, usize)>> {
    let sig_len = buf.len().min(V2_SIGNATURE.len());
    if buf[..sig_len] == V2_SIGNATURE[..sig_len] {
        if buf.len() < 16 {
            return Ok(None);
        }
        return parse_v2(buf);
    }
    let v1_len = buf.len().min(6);
    if buf[..v1_len] == b"PROXY "[..v1_len] {
        return parse_v1(buf);
    }
    Err(bad(
        "the connection does not start with a PROXY header (v1 or v2)",
    ))
}

fn parse_v1(buf: &[u8]) -> io::Result<Option<(ProxyHeader, usize)>> {
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        if buf.len() >= V1_MAX {
            return Err(bad("v1 header longer than 107 bytes"));
        }
        return Ok(None);
    };
    let used = end + 2;
    if used > V1_MAX {
        return Err(bad("v1 header longer than 107 bytes"));
    }
    let line = std::str::from_utf8(&buf[..end]).map_err(|_| bad("v1 header is not ASCII"))?;
    let parts: Vec<&str> = line.split(' ').collect();
    match parts.as_slice() {
        ["PROXY", "UNKNOWN", ..] => Ok(Some((ProxyHeader::Local, used))),
        ["PROXY", fam @ ("TCP4" | "TCP6"), src, dst, sport, dport] => {
            let ip = |s: &str| -> io::Result<IpAddr> {
                let ip: IpAddr = s.parse().map_err(|_| bad(format!("bad address `{s}`")))?;
                match (*fam, ip) {
                    ("TCP4", IpAddr::V4(_)) | ("TCP6", IpAddr::V6(_)) => Ok(ip),
                    _ => Err(bad(format!("address `{s}` is not {fam}"))),
                }
            };
            let port = |s: &str| -> io::Result<u16> {
                // The spec forbids leading zeros; u16's parse rejects signs and overflow.
                if s.len() > 1 && s.starts_with('0') {
                    return Err(bad(format!("bad port `{s}`")));
                }
                s.parse().map_err(|_| bad(format!("bad port `{s}`")))
            };
            Ok(Some((
                ProxyHeader::Proxied {
                    source: SocketAddr::new(ip(src)?, port(sport)?),
                    destination: SocketAddr::new(ip(dst)?, port(dport)?),
                },
                used,
            )))
        }
        _ => Err(bad(format!("malformed v1 header `{line}`"))),
    }
}

fn parse_v2(buf: &[u8]) -> io::Result<Option<(ProxyHeader, usize)>> {
    let ver_cmd = buf[12];
    if ver_cmd >> 4 != 2 {
        return Err(bad(format!("v2 header with version {}", ver_cmd >> 4)));
    }
    let fam = buf[13];
    let len = u16::from_be_bytes([buf[14], buf[15]]) as usize;
    if len > V2_MAX_BODY {
        return Err(bad(format!("v2 address block of {len} bytes is too long")));
    }
    if buf.len() < 16 + len {
        return Ok(None);
    }
    let body = &buf[16..16 + len];
    let used = 16 + len;
    match ver_cmd & 0x0F {
        0 => return Ok(Some((ProxyHeader::Local, used))),
        1 => {}
        c => return Err(bad(format!("v2 header with unknown command {c}"))),
    }
    let header = match fam {
        0x11 => {
            if body.len() < 12 {
                return Err(bad("v2 TCP4 address block too short"));
            }
            let a = |o: usize| Ipv4Addr::new(body[o], body[o + 1], body[o + 2], body[o + 3]);
            ProxyHeader::Proxied {
                source: SocketAddr::new(a(0).into(), u16::from_be_bytes([body[8], body[9]])),
                destination: SocketAddr::new(a(4).into(), u16::from_be_bytes([body[10], body[11]])),
            }
        }
        0x21 => {
            if body.len() < 36 {
                return Err(bad("v2 TCP6 address block too short"));
            }
            let a = |o: usize| {
                let mut b = [0u8; 16];
                b.copy_from_slice(&body[o..o + 16]);
                Ipv6Addr::from(b)
            };
            ProxyHeader::Proxied {
                source: SocketAddr::new(a(0).into(), u16::from_be_bytes([body[32], body[33]])),
                destination: SocketAddr::new(
                    a(16).into(),
                    u16::from_be_bytes([body[34], body[35]]),
                ),
            }
        }
        // UNSPEC, UDP and UNIX: nothing we can use as a client address.
        0x00 | 0x12 | 0x22 | 0x31 | 0x32 => ProxyHeader::Local,
        f => {
            return Err(bad(format!(
                "v2 header with unknown address family 0x{f:02x}"
            )));
        }
    };
    Ok(Some((header, used)))
}

/// Reads a PROXY header from `stream`. Returns it and any bytes read past its end (the
/// start of the client's own data), which must be handed on first.
pub async fn read_header<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> io::Result<(ProxyHeader, Vec<u8>)> {
    let mut buf = Vec::with_capacity(256);
    loop {
        if !buf.is_empty()
            && let Some((h, used)) = parse(&buf)?
        {
            return Ok((h, buf.split_off(used)));
        }
        let mut chunk = [0u8; 256];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "PROXY protocol: connection closed before the header ended",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_tcp4_and_leftover() {
        let hdr = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 1883\r\n\x10\x00";
        let (h, used) = parse(hdr).unwrap().unwrap();
        assert_eq!(used, hdr.len() - 2);
        assert_eq!(
            h,
            ProxyHeader::Proxied {
                source: "192.0.2.1:56324".parse().unwrap(),
                destination: "198.51.100.2:1883".parse().unwrap()
            }
        );
    }

    #[test]
    fn v1_tcp6_unknown_partial_and_errors() {
        let (h, _) = parse(b"PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\n")
            .unwrap()
            .unwrap();
        assert!(matches!(h, ProxyHeader::Proxied { source, .. } if source.port() == 1));
        assert_eq!(
            parse(b"PROXY UNKNOWN\r\n").unwrap(),
            Some((ProxyHeader::Local, 15))
        );
        assert_eq!(parse(b"PROXY TCP4 1.2.3.4").unwrap(), None);
        assert_eq!(parse(b"PRO").unwrap(), None);
        for bad in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
            b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 70000 2\r\n",
            b"PROXY TCP4 1.2.3.4\r\n",
            b"\x10\x0c\x00\x04MQTT",
        ] {
            assert!(
                parse(bad).is_err(),
                "{:?} accepted",
                String::from_utf8_lossy(bad)
            );
        }
        let long = [b"PROXY ".as_slice(), &[b'x'; 120]].concat();
        assert!(parse(&long).is_err(), "overlong v1 header accepted");
    }

    fn v2(cmd: u8, fam: u8, body: &[u8]) -> Vec<u8> {
        let mut v = V2_SIGNATURE.to_vec();
        v.push(0x20 | cmd);
        v.push(fam);
        v.extend_from_slice(&(body.len() as u16).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn v2_tcp4_tcp6_local_and_tlvs() {
        let body = [
            10, 0, 0, 1, 10, 0, 0, 2, 0x30, 0x39, 0x07, 0x5b, 0x03, 0x00, 0x01, 0xAA,
        ];
        let mut h = v2(1, 0x11, &body);
        h.push(0x10); // the client's first MQTT byte
        let (p, used) = parse(&h).unwrap().unwrap();
        assert_eq!(used, h.len() - 1);
        assert_eq!(
            p,
            ProxyHeader::Proxied {
                source: "10.0.0.1:12345".parse().unwrap(),
                destination: "10.0.0.2:1883".parse().unwrap()
            }
        );
        let mut b6 = [0u8; 36];
        b6[15] = 1;
        b6[31] = 2;
        b6[32..34].copy_from_slice(&7u16.to_be_bytes());
        let (p, _) = parse(&v2(1, 0x21, &b6)).unwrap().unwrap();
        assert_eq!(
            p,
            ProxyHeader::Proxied {
                source: "[::1]:7".parse().unwrap(),
                destination: "[::2]:0".parse().unwrap()
            }
        );
        assert_eq!(
            parse(&v2(0, 0x00, &[])).unwrap(),
            Some((ProxyHeader::Local, 16))
        );
        // Incomplete body: need more.
        assert_eq!(parse(&v2(1, 0x11, &body)[..20]).unwrap(), None);
        // Wrong version, unknown command, short body, unknown family.
        let mut wrong = v2(1, 0x11, &body);
        wrong[12] = 0x11;
        assert!(parse(&wrong).is_err());
        assert!(parse(&v2(2, 0x11, &body)).is_err());
        assert!(parse(&v2(1, 0x11, &body[..8])).is_err());
        assert!(parse(&v2(1, 0x45, &body)).is_err());
    }

    #[tokio::test]
    async fn read_header_returns_the_bytes_after_it() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        use tokio::io::AsyncWriteExt;
        a.write_all(b"PROXY TCP4 1.1.1.1 2.2.2.2 1 2\r\nhello")
            .await
            .unwrap();
        let (h, rest) = read_header(&mut b).await.unwrap();
        assert!(matches!(h, ProxyHeader::Proxied { .. }));
        assert_eq!(rest, b"hello");
        drop(a);
        let (_a, mut b) = tokio::io::duplex(1024);
        drop(_a);
        assert!(read_header(&mut b).await.is_err());
    }
}
