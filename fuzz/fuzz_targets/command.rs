//! Client bytes → framer → command parser. Any input: no panic, lines
//! bounded by MAX_LINE, and what the parser accepts as PORT/EPRT is a
//! usable address.
#![no_main]

use ftpgate::ftp::{parse_command, Command, Framer, MAX_LINE};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut framer = Framer::new();
    // Feed in uneven pieces: the first byte picks the chunk size, so one
    // input explores line splits at many boundaries.
    let (step, rest) = match data.split_first() {
        Some((s, r)) => (usize::from(*s % 17) + 1, r),
        None => return,
    };
    for chunk in rest.chunks(step) {
        framer.push(chunk);
        loop {
            match framer.next_line() {
                Ok(Some(line)) => {
                    assert!(line.as_received().len() <= MAX_LINE);
                    // At most one LF, and only at the end.
                    let lf = line.as_received().iter().position(|&b| b == b'\n');
                    assert!(lf.is_none_or(|i| i + 1 == line.as_received().len()));
                    let text = line.text();
                    if let Ok(p) = parse_command(&text) {
                        match p.command {
                            Command::Port(a) => assert_ne!(a.port(), 0),
                            Command::Eprt(a) => assert_ne!(a.port(), 0),
                            _ => {}
                        }
                    }
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
