//! grpc-web framing for tests that speak it by hand (over HTTP/1.1 with reqwest): request frames
//! and the response's data and trailer frames.

use bytes::{Buf, BytesMut};
use prost::Message;

/// A grpc-web request body: one uncompressed data frame.
pub fn frame(msg: &impl Message) -> Vec<u8> {
    let body = msg.encode_to_vec();
    let mut out = vec![0u8];
    out.extend((body.len() as u32).to_be_bytes());
    out.extend(body);
    out
}

/// Splits complete grpc-web frames off `buf`: (is_trailer, payload).
pub fn frames(buf: &mut BytesMut) -> Vec<(bool, Vec<u8>)> {
    let mut out = vec![];
    while buf.len() >= 5 {
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        if buf.len() < 5 + len {
            break;
        }
        let flag = buf[0];
        buf.advance(5);
        out.push((flag & 0x80 != 0, buf.split_to(len).to_vec()));
    }
    out
}
