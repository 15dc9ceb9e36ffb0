//! Feeds arbitrary bytes, as a stream in arbitrary chunks, to the decoder under each
//! protocol version and a small maximum packet size. It must never panic, never loop, and
//! never consume bytes it reported as incomplete.
#![no_main]

use halyard_codec::{BytesMut, ProtocolVersion, decode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, data)) = data.split_first() else {
        return;
    };
    let version = match ctl % 3 {
        0 => ProtocolVersion::V3_1,
        1 => ProtocolVersion::V3_1_1,
        _ => ProtocolVersion::V5,
    };
    let max = if ctl & 0x80 != 0 {
        64
    } else {
        halyard_codec::MAX_PACKET_SIZE
    };
    let chunk = usize::from((ctl >> 2) & 0x1F) + 1;
    let mut buf = BytesMut::new();
    for piece in data.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            let before = buf.len();
            match decode(&mut buf, version, max) {
                Ok(Some(_)) => assert!(buf.len() < before, "a packet consumed no bytes"),
                Ok(None) => {
                    assert_eq!(buf.len(), before, "incomplete consumed bytes");
                    break;
                }
                Err(_) => return,
            }
        }
    }
});
