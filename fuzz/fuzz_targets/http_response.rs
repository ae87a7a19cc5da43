//! Client side of `api::http`: any bytes into `parse_response_head`, and the bytes
//! after a parsed head (or all of them) into `ChunkedDecoder`. The decoder must
//! not panic and must give the same result whether the input arrives at once or
//! split at a point chosen by the first byte.
#![no_main]

use agentlab::api::http::{parse_response_head, ChunkedDecoder, HttpError, Limits};
use libfuzzer_sys::fuzz_target;

fn decode(pieces: &[&[u8]]) -> (Result<bool, HttpError>, Vec<u8>) {
    let (mut decoder, mut out) = (ChunkedDecoder::new(4096), Vec::new());
    let mut done = Ok(false);
    for piece in pieces {
        done = decoder.feed(piece, &mut out);
        if done.is_err() {
            break;
        }
    }
    (done, out)
}

fuzz_target!(|data: &[u8]| {
    let body = match parse_response_head(data, &Limits::default()) {
        Ok(Some((_, consumed))) => {
            assert!(consumed > 0 && consumed <= data.len());
            &data[consumed..]
        }
        _ => data,
    };
    let at = data
        .first()
        .map_or(0, |&b| usize::from(b) % (body.len() + 1));
    let (front, back) = body.split_at(at);
    assert_eq!(decode(&[body]), decode(&[front, back]));
});
