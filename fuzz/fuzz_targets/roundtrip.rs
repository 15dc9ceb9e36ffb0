//! Whatever the decoder accepts must encode (for the same version) to bytes that decode to
//! the same packet, with `encoded_len` exact.
#![no_main]

use halyard_codec::{Bytes, BytesMut, MAX_PACKET_SIZE, Packet, ProtocolVersion, decode};
use libfuzzer_sys::fuzz_target;

fn strip(p: Packet) -> Packet {
    match p {
        Packet::Publish(mut x) => {
            x.raw_properties = Bytes::new();
            Packet::Publish(x)
        }
        other => other,
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, data)) = data.split_first() else {
        return;
    };
    let version = if ctl & 1 == 0 {
        ProtocolVersion::V3_1_1
    } else {
        ProtocolVersion::V5
    };
    let mut buf = BytesMut::from(data);
    while let Ok(Some(p)) = decode(&mut buf, version, MAX_PACKET_SIZE) {
        let ver = match &p {
            Packet::Connect(c) => c.protocol,
            _ => version,
        };
        let mut out = BytesMut::new();
        if p.encode(ver, &mut out).is_err() {
            continue;
        }
        assert_eq!(out.len(), p.encoded_len(ver));
        let again = decode(&mut out, ver, MAX_PACKET_SIZE)
            .expect("re-encoded packet must decode")
            .expect("re-encoded packet must be complete");
        assert!(out.is_empty());
        assert_eq!(strip(again), strip(p));
    }
});
