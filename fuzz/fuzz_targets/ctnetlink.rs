//! Kernel bytes → the conntrack netlink parser: whatever arrives, it
//! returns records and never panics; a GET request built from a parsed
//! tuple is well formed.
#![no_main]

use ftpgate::netfilter::ctnetlink::{get_request, parse, Record};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for r in parse(data) {
        if let Record::Conn { conn, .. } = r {
            let _ = conn.finishing();
            // A GET for a parsed tuple is well formed: its length is its size.
            let req = get_request(1, conn.orig);
            assert_eq!(
                u32::from_ne_bytes([req[0], req[1], req[2], req[3]]) as usize,
                req.len()
            );
        }
    }
});
