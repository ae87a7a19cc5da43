//! Server side of `api::http`: any bytes into `parse_request`, under the default
//! limits and under tiny ones (so the 413/431 paths are reached), must not panic,
//! and a parsed request must be self-delimiting: re-parsing exactly the consumed
//! bytes gives the same request.
#![no_main]

use agentlab::api::http::{parse_request, Limits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let tiny = Limits {
        max_head: 64,
        max_body: 16,
    };
    for limits in [Limits::default(), tiny] {
        if let Ok(Some((request, consumed))) = parse_request(data, &limits) {
            assert!(consumed > 0 && consumed <= data.len());
            let (again, again_consumed) = parse_request(&data[..consumed], &limits)
                .expect("consumed prefix parses")
                .expect("consumed prefix is whole");
            assert_eq!((again, again_consumed), (request.clone(), consumed));
            let _ = (request.path_segments(), request.header("host"));
        }
    }
});
