//! QMP lines from QEMU: any bytes, framed or not, give a message or an
//! error, never a panic.
#![no_main]

use agentlab::framing::LineFramer;
use agentlab::qmp::parse_message;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = parse_message(data);
    let mut framer = LineFramer::new(4096);
    framer.push(data);
    loop {
        match framer.next_line() {
            Ok(Some(line)) => {
                let _ = parse_message(&line);
            }
            Ok(None) => break,
            // An overlong line was dropped; framing goes on after it.
            Err(_) => continue,
        }
    }
});
