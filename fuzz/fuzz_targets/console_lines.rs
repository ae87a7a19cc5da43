//! The guest's serial console is guest-controlled: any bytes, split anywhere,
//! must come out as lines no longer than the cap, with no control characters
//! or bidi overrides, and splitting the input differently must not change
//! the lines.
#![no_main]

use agentlab::backend::qemu::console::{LineSplitter, MAX_LINE};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut whole = LineSplitter::default();
    let lines = whole.feed(data);
    let mut split = LineSplitter::default();
    let cut = data.len() / 2;
    let mut again = split.feed(&data[..cut]);
    again.extend(split.feed(&data[cut..]));
    assert_eq!(lines, again);
    for l in &lines {
        assert!(l.len() <= MAX_LINE * 3, "a line longer than the cap allows");
        assert!(!l.chars().any(|c| c.is_control() && c != '\t'));
        assert!(!l.contains('\u{202E}'));
    }
});
