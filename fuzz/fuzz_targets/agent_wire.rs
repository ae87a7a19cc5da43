//! What a guest agent sends the host: any bytes, split anywhere, give
//! frames or errors, never a panic, and never more held than the caps allow.
//! Every JSON frame is parsed as the host parses it (message, then the typed
//! answers and events, then base64 payloads).
#![no_main]

use agentlab::qga::{b64, wire};
use libfuzzer_sys::fuzz_target;

const MAX_JSON: usize = 1 << 16;

fuzz_target!(|data: &[u8]| {
    // The first byte picks where the input is split into reads.
    let Some((&split, data)) = data.split_first() else {
        return;
    };
    let step = usize::from(split).max(1);
    let mut d = wire::Decoder::new(MAX_JSON);
    for chunk in data.chunks(step) {
        d.push(chunk);
        for frame in d.by_ref() {
            match frame {
                Ok(wire::Frame::Json(bytes)) => {
                    assert!(bytes.len() <= MAX_JSON + step);
                    parse(&bytes);
                }
                Ok(wire::Frame::Data { payload, .. }) => assert!(payload.len() <= wire::MAX_DATA),
                Ok(wire::Frame::Sync) | Err(_) => {}
            }
        }
        assert!(d.buffered() <= MAX_JSON + wire::DATA_HEADER + wire::MAX_DATA + step);
    }
});

fn parse(bytes: &[u8]) {
    let Ok(message) = wire::Message::parse(bytes) else {
        return;
    };
    match message {
        wire::Message::Return { value, .. } => {
            let _ = serde_json::from_value::<wire::Started>(value.clone());
            if let Ok(st) = serde_json::from_value::<wire::GuestExecStatus>(value.clone()) {
                let _ = st.out_data.as_deref().map(b64::decode);
            }
            if let Ok(r) = serde_json::from_value::<wire::GuestFileRead>(value) {
                let _ = b64::decode(&r.buf_b64);
            }
        }
        wire::Message::Event { data, .. } => {
            let _ = serde_json::from_value::<wire::Exit>(data.clone());
            let _ = serde_json::from_value::<wire::TarDone>(data.clone());
            let _ = serde_json::from_value::<wire::StreamCredit>(data);
        }
        _ => {}
    }
}
