//! Server bytes → framer → reply tracker and the 227/229 parsers.
#![no_main]

use ftpgate::ftp::{parse_227, parse_229, parse_reply_line, Framer, ReplyTracker};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Each parser on the raw input too, without a framer in front.
    if let Some(a) = parse_227(data) {
        assert_ne!(a.port(), 0);
    }
    if let Some(p) = parse_229(data) {
        assert_ne!(p, 0);
    }
    let _ = parse_reply_line(data);
    let mut framer = Framer::new();
    let mut tracker = ReplyTracker::default();
    framer.push(data);
    while let Ok(Some(line)) = framer.next_line() {
        let text = line.text();
        let _ = tracker.push(&text);
        let _ = parse_227(&text);
        let _ = parse_229(&text);
    }
});
