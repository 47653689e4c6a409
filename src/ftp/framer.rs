//! Splits a control stream into lines.
//!
//! RFC 959 §4.1 ends every command and reply with the Telnet end-of-line
//! `CR LF`; real peers also send a bare `LF`, so a line ends at `LF`. The
//! control connection is a Telnet NVT (RFC 854), so `IAC` (0xFF) starts a
//! two- or three-byte sequence that must never be split, and whose second
//! or third byte may even be an `LF`.

use std::borrow::Cow;
use std::collections::VecDeque;

/// Longest line accepted, terminator included. RFC 959 commands are short;
/// this leaves room for long paths while bounding memory per session.
pub const MAX_LINE: usize = 4096;

/// Buffer room a drained framer keeps; more (after a burst of pipelined
/// lines, or a long line) is freed, so an idle session holds little.
const SPARE_BYTES: usize = 256;
/// Line ends a drained framer keeps room for.
const SPARE_LINES: usize = 16;

/// Telnet "interpret as command" — RFC 854.
const IAC: u8 = 0xFF;
/// Telnet WILL (0xFB), WONT (0xFC), DO (0xFD), DONT (0xFE) take one option
/// byte after them — RFC 854.
const IAC_OPTION_VERBS: std::ops::RangeInclusive<u8> = 0xFB..=0xFE;

/// One framed line, lent by [`Framer::next_line`] until the framer is used
/// again; copy `raw` to keep it longer.
#[derive(Debug, Clone, Copy)]
pub struct Line<'a> {
    /// The bytes exactly as received, terminator and Telnet sequences included,
    /// so that a line forwarded unchanged is byte-identical.
    pub raw: &'a [u8],
    /// Length of the text when the framer saw no IAC in the line, so that
    /// [`Line::text`] need not scan it again; `None`: not known.
    text_len: Option<u16>,
}

/// Lines are equal when their bytes are; how the text is found is no part
/// of the value.
impl PartialEq for Line<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.raw == other.raw
    }
}

impl Eq for Line<'_> {}

impl<'a> Line<'a> {
    /// A line over `raw`, as received (terminator included).
    pub fn new(raw: &'a [u8]) -> Self {
        Line {
            raw,
            text_len: None,
        }
    }

    /// The line's text: terminator removed and Telnet IAC sequences stripped
    /// (`IAC IAC` becomes one 0xFF byte). This is what the parsers read.
    ///
    /// `RETR a\xff\xffb\r\n` → `RETR a\xffb`; `\xff\xf4\xff\xf2ABOR\r\n`
    /// (IAC IP, IAC DM — RFC 959 §4.1.3) → `ABOR`.
    ///
    /// Borrowed from the line unless it holds a Telnet sequence before its
    /// end.
    pub fn text(&self) -> Cow<'a, [u8]> {
        let raw = self.raw;
        if let Some(text) = self.text_len.and_then(|n| raw.get(..usize::from(n))) {
            return Cow::Borrowed(text);
        }
        // No IAC before the first LF (almost every line): the text is a
        // slice of the line.
        match find_lf_or_iac(raw) {
            None => Cow::Borrowed(raw),
            Some(lf) if raw[lf] == b'\n' => Cow::Borrowed(plain_text(&raw[..=lf])),
            Some(_) => Cow::Owned(strip_telnet(raw)),
        }
    }
}

/// The text of a line that ends at its LF and holds no IAC: the line
/// without its LF and a CR just before it.
fn plain_text(line: &[u8]) -> &[u8] {
    let text = line.strip_suffix(b"\n").unwrap_or(line);
    text.strip_suffix(b"\r").unwrap_or(text)
}

/// Where a ready line ends in [`Framer::ready`], and its text length if
/// known (see [`Line::text`]).
#[derive(Debug, Clone, Copy)]
struct Ready {
    end: usize,
    text_len: Option<u16>,
}

/// The first LF or IAC in `bytes`. A control line is a few dozen bytes, too
/// short for memchr's vector set-up to pay: the first 64 bytes are searched
/// eight at a time in a u64, the rest with memchr.
fn find_lf_or_iac(bytes: &[u8]) -> Option<usize> {
    const ONES: u64 = u64::from_le_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_le_bytes([0x80; 8]);
    const LFS: u64 = u64::from_le_bytes([b'\n'; 8]);
    /// High bit set in each byte of the result at or after the first zero
    /// byte of `v`, and the lowest one exactly there.
    fn zero_bytes(v: u64) -> u64 {
        v.wrapping_sub(ONES) & !v & HIGHS
    }
    let head = &bytes[..bytes.len().min(64)];
    let mut words = head.chunks_exact(8);
    let mut at = 0;
    for word in &mut words {
        let x = u64::from_le_bytes(<[u8; 8]>::try_from(word).unwrap_or_default());
        // LF bytes become zero in `x ^ LFS`, IAC (0xFF) bytes in `!x`.
        let hits = zero_bytes(x ^ LFS) | zero_bytes(!x);
        if hits != 0 {
            return Some(at + (hits.trailing_zeros() / 8) as usize);
        }
        at += 8;
    }
    if let Some(i) = words
        .remainder()
        .iter()
        .position(|&b| b == b'\n' || b == IAC)
    {
        return Some(at + i);
    }
    let tail = bytes.get(head.len()..)?;
    memchr::memchr2(b'\n', IAC, tail).map(|i| head.len() + i)
}

/// [`Line::text`] for a line that holds Telnet sequences: copies the data
/// bytes up to the terminator.
fn strip_telnet(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len());
    // Index just past the last byte copied verbatim, so that only a CR
    // directly before the terminating LF is taken as part of CRLF.
    let mut plain_end = usize::MAX;
    let mut i = 0;
    while let Some(&b) = raw.get(i) {
        match b {
            IAC => match raw.get(i + 1) {
                Some(&IAC) => {
                    out.push(IAC);
                    i += 2;
                }
                Some(verb) if IAC_OPTION_VERBS.contains(verb) => i += 3,
                // `IAC x` is two bytes; a lone IAC at the end is dropped.
                _ => i += 2,
            },
            b'\n' => {
                if plain_end == i && out.last() == Some(&b'\r') {
                    out.pop();
                }
                break;
            }
            _ => {
                out.push(b);
                i += 1;
                plain_end = i;
            }
        }
    }
    out
}

/// A framing violation: the session must be closed after a 500.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// More than [`MAX_LINE`] bytes arrived without a line end.
    #[error("line longer than {0} bytes")]
    TooLong(usize),
}

/// Where the scanner stands relative to a Telnet sequence.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Telnet {
    /// Ordinary data.
    #[default]
    Data,
    /// After `IAC`: the next byte is its command, never a terminator.
    Command,
    /// After `IAC WILL/WONT/DO/DONT`: the next byte is the option.
    Option,
}

/// Incremental line framer. Feed it any split of the stream; it yields the
/// same lines. Ends a line at LF (CRLF or bare LF). Keeps Telnet IAC
/// sequences (`IAC x`, `IAC WILL/WONT/DO/DONT x`) intact and never ends a
/// line inside one.
///
/// Bytes are scanned once, as they are pushed, so byte-at-a-time input costs
/// O(n). A partial line never holds more than [`MAX_LINE`] bytes: once it
/// would, the framer reports [`FrameError::TooLong`] after the lines
/// completed before it, and drops further input.
#[derive(Debug, Default)]
pub struct Framer {
    /// Lines already terminated, back to back, waiting for `next_line`;
    /// the first one starts at `read`. Once all are taken, the buffer is
    /// emptied at the next call (the last line taken is lent from it).
    ready: Vec<u8>,
    /// Where each line in `ready` ends (exclusive), in order.
    ends: VecDeque<Ready>,
    /// Start of the first line in `ready` not yet returned.
    read: usize,
    /// The line being received, without its terminator yet.
    partial: Vec<u8>,
    /// Whether `partial` holds an IAC (then its text needs a Telnet scan).
    partial_iac: bool,
    /// Telnet state at the end of `partial`.
    telnet: Telnet,
    /// Set once a line overflowed; the stream is unusable after that.
    overflow: bool,
    /// Lines completed so far (terminated, whether taken yet or not).
    completed: u64,
}

impl Framer {
    /// A framer with an empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received bytes.
    pub fn push(&mut self, mut bytes: &[u8]) {
        if self.ends.is_empty() && self.read != 0 {
            // The last line taken is no longer lent.
            self.drained();
        }
        if !self.overflow {
            // Room for every line this segment may complete, at once: its
            // bytes, and line ends for lines of 16 bytes or more (regrowing
            // the queue line by line costs more than the spare room).
            self.ready.reserve(bytes.len());
            self.ends.reserve(bytes.len().min(MAX_LINE) / 16);
        }
        while !self.overflow {
            let Some((&first, rest)) = bytes.split_first() else {
                return;
            };
            match self.telnet {
                Telnet::Command => {
                    self.telnet = if IAC_OPTION_VERBS.contains(&first) {
                        Telnet::Option
                    } else {
                        Telnet::Data
                    };
                    self.append(&bytes[..1], false);
                    bytes = rest;
                }
                Telnet::Option => {
                    self.telnet = Telnet::Data;
                    self.append(&bytes[..1], false);
                    bytes = rest;
                }
                Telnet::Data => {
                    // Copy a run of ordinary bytes at once, up to and
                    // including the next byte that matters.
                    let stop = find_lf_or_iac(bytes);
                    let take = stop.map_or(bytes.len(), |i| i + 1);
                    let (run, rest) = bytes.split_at(take);
                    let ends_line = run.last() == Some(&b'\n');
                    if ends_line && self.partial.is_empty() && run.len() <= MAX_LINE {
                        // The whole line is in this segment, without an
                        // IAC: straight to the ready lines.
                        self.complete(run, true);
                        bytes = rest;
                        continue;
                    }
                    self.append(run, ends_line);
                    if ends_line && !self.overflow {
                        let partial = std::mem::take(&mut self.partial);
                        self.complete(&partial, !self.partial_iac);
                        self.partial_iac = false;
                        if partial.capacity() <= SPARE_BYTES {
                            self.partial = partial;
                            self.partial.clear();
                        }
                    } else if stop.is_some() {
                        self.telnet = Telnet::Command;
                        self.partial_iac = true;
                    }
                    bytes = rest;
                }
            }
        }
    }

    /// Queues one terminated line; `plain` when it holds no IAC.
    fn complete(&mut self, line: &[u8], plain: bool) {
        self.ready.extend_from_slice(line);
        let text_len = if plain {
            u16::try_from(plain_text(line).len()).ok()
        } else {
            None
        };
        self.ends.push_back(Ready {
            end: self.ready.len(),
            text_len,
        });
        self.completed += 1;
    }

    /// How many lines have been terminated since the framer was made: bytes
    /// that complete no line (a trickle) leave it unchanged.
    pub fn lines_completed(&self) -> u64 {
        self.completed
    }

    /// Adds `run` to the partial line unless that breaks the cap. A line may
    /// be `MAX_LINE` bytes with its terminator, so an unterminated partial
    /// line of `MAX_LINE` bytes can never end in time.
    fn append(&mut self, run: &[u8], ends_line: bool) {
        let len = self.partial.len() + run.len();
        if len > MAX_LINE || (!ends_line && len == MAX_LINE) {
            self.overflow = true;
            return;
        }
        self.partial.extend_from_slice(run);
    }

    /// The next complete line, lent until the framer is used again:
    /// `Ok(None)` when more bytes are needed.
    pub fn next_line(&mut self) -> Result<Option<Line<'_>>, FrameError> {
        match self.ends.pop_front() {
            Some(Ready { end, text_len }) => {
                let start = std::mem::replace(&mut self.read, end);
                let raw = self.ready.get(start..end).unwrap_or_default();
                Ok(Some(Line { raw, text_len }))
            }
            None => {
                self.drained();
                if self.overflow {
                    Err(FrameError::TooLong(MAX_LINE))
                } else {
                    Ok(None)
                }
            }
        }
    }

    /// Every ready line was taken: empties the buffer, and frees it if a
    /// burst made it large.
    fn drained(&mut self) {
        self.read = 0;
        self.ready.clear();
        if self.ready.capacity() > SPARE_BYTES {
            self.ready = Vec::new();
        }
        if self.ends.capacity() > SPARE_LINES {
            self.ends = VecDeque::new();
        }
    }

    /// Memory held for input, in bytes: lines not yet returned by
    /// [`Framer::next_line`] with the bookkeeping of each, and the partial
    /// line. The session bounds this per peer; counting each line's entry
    /// keeps a flood of empty lines within the bound too.
    pub fn buffered(&self) -> usize {
        self.ready.len().saturating_sub(self.read)
            + self.ends.len() * std::mem::size_of::<Ready>()
            + self.partial.len()
    }

    /// Takes the bytes buffered but not yet framed (used when the stream
    /// stops being parsed, e.g. after TLS starts, so nothing is lost).
    ///
    /// This includes lines already split off but not yet returned by
    /// [`Framer::next_line`], in stream order, and leaves the framer empty.
    /// After an overflow, the bytes dropped past the cap are not included.
    pub fn take_buffered(&mut self) -> Vec<u8> {
        let mut out = self.ready.split_off(self.read);
        self.ends.clear();
        self.drained();
        out.append(&mut self.partial);
        self.partial_iac = false;
        self.telnet = Telnet::Data;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Feeds `chunks` one push at a time, draining lines after each push.
    fn frame(chunks: &[&[u8]]) -> (Vec<Vec<u8>>, Option<FrameError>) {
        let mut framer = Framer::new();
        let mut lines = Vec::new();
        for chunk in chunks {
            framer.push(chunk);
            loop {
                match framer.next_line() {
                    Ok(Some(line)) => lines.push(line.raw.to_vec()),
                    Ok(None) => break,
                    Err(e) => return (lines, Some(e)),
                }
            }
        }
        (lines, None)
    }

    /// Input, the raw lines it frames into, and what stays buffered.
    type LineCase = (&'static [u8], &'static [&'static [u8]], &'static [u8]);

    #[test]
    fn lines_table() {
        let cases: &[LineCase] = &[
            (b"USER a\r\n", &[b"USER a\r\n"], b""),
            (b"USER a\n", &[b"USER a\n"], b""),
            (b"USER a", &[], b"USER a"),
            // a lone CR is not a terminator
            (b"A\rB\r\n", &[b"A\rB\r\n"], b""),
            (b"A\r", &[], b"A\r"),
            // pipelined commands in one segment
            (
                b"USER a\r\nPASS b\r\nPASV\r\n",
                &[b"USER a\r\n", b"PASS b\r\n", b"PASV\r\n"],
                b"",
            ),
            (b"\r\n\n", &[b"\r\n", b"\n"], b""),
            // NUL is an ordinary byte
            (b"RETR a\0b\r\n", &[b"RETR a\0b\r\n"], b""),
            // IAC x never ends a line, even when x is LF
            (b"A\xff\nB\r\n", &[b"A\xff\nB\r\n"], b""),
            // IAC DO LF: the option byte is not a terminator either
            (b"A\xff\xfd\nB\n", &[b"A\xff\xfd\nB\n"], b""),
            // IAC IAC LF: the escaped 0xFF is done, the LF ends the line
            (b"A\xff\xff\nB\n", &[b"A\xff\xff\n", b"B\n"], b""),
            // IAC at the end waits for its command byte
            (b"A\xff", &[], b"A\xff"),
            (b"A\xff\xfb", &[], b"A\xff\xfb"),
        ];
        for (input, want_lines, want_rest) in cases {
            let mut framer = Framer::new();
            framer.push(input);
            let mut got = Vec::new();
            while let Ok(Some(line)) = framer.next_line() {
                got.push(line.raw.to_vec());
            }
            let want: Vec<Vec<u8>> = want_lines.iter().map(|l| l.to_vec()).collect();
            assert_eq!(got, want, "input {input:?}");
            assert_eq!(
                framer.take_buffered(),
                want_rest.to_vec(),
                "input {input:?}"
            );
        }
    }

    #[test]
    fn text_table() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"USER a\r\n", b"USER a"),
            (b"USER a\n", b"USER a"),
            (b"USER a", b"USER a"),
            (b"A\rB\r\n", b"A\rB"),
            (b"A\r\r\n", b"A\r"),
            (b"RETR a\0b\r\n", b"RETR a\0b"),
            // IAC IAC is one 0xFF data byte
            (b"RETR a\xff\xffb\r\n", b"RETR a\xffb"),
            // IAC IP, IAC DM before ABOR (RFC 959 §4.1.3)
            (b"\xff\xf4\xff\xf2ABOR\r\n", b"ABOR"),
            // IAC WILL x is three bytes, whatever x is
            (b"NO\xff\xfb\nOP\r\n", b"NOOP"),
            (b"NO\xff\xfe\xffOP\r\n", b"NOOP"),
            // IAC CR LF: the CR belongs to the Telnet sequence, not to CRLF
            (b"A\xff\r\n", b"A"),
            // an incomplete sequence at the end is dropped
            (b"A\xff", b"A"),
            (b"A\xff\xfd", b"A"),
        ];
        for (raw, want) in cases {
            let line = Line::new(raw);
            assert_eq!(line.text(), want.to_vec(), "raw {raw:?}");
        }
    }

    #[test]
    fn word_search_at_every_position() {
        for len in 0..150 {
            for at in 0..len {
                for hit in [b'\n', IAC] {
                    let mut bytes = vec![b'a'; len];
                    bytes[at] = hit;
                    assert_eq!(find_lf_or_iac(&bytes), Some(at), "len {len} at {at}");
                }
            }
            assert_eq!(find_lf_or_iac(&vec![0xFE; len]), None, "len {len}");
        }
    }

    #[test]
    fn byte_at_a_time_matches_one_push() {
        let stream: &[u8] = b"USER a\r\n\xff\xf4\xff\xf2ABOR\r\nRETR \xff\xff\n\xff\xfd\nX\r\nPAS";
        let whole = frame(&[stream]);
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(frame(&bytes), whole);
        assert_eq!(whole.0.len(), 4);
    }

    #[test]
    fn longest_line_accepted_one_more_rejected() {
        let mut ok = vec![b'a'; MAX_LINE - 2];
        ok.extend_from_slice(b"\r\n");
        let (lines, err) = frame(&[&ok]);
        assert_eq!((lines.len(), err), (1, None));

        let mut long = vec![b'a'; MAX_LINE - 1];
        long.extend_from_slice(b"\r\n");
        let (lines, err) = frame(&[&long]);
        assert_eq!((lines.len(), err), (0, Some(FrameError::TooLong(MAX_LINE))));

        // `MAX_LINE` bytes without a terminator cannot become a valid line
        let (_, err) = frame(&[&vec![b'a'; MAX_LINE]]);
        assert_eq!(err, Some(FrameError::TooLong(MAX_LINE)));
        let (_, err) = frame(&[&vec![b'a'; MAX_LINE - 1]]);
        assert_eq!(err, None);
    }

    #[test]
    fn endless_line_is_rejected_early_with_bounded_memory() {
        let mut framer = Framer::new();
        let chunk = [b'x'; 1024];
        let mut pushed = 0;
        let err = loop {
            framer.push(&chunk);
            pushed += chunk.len();
            if let Err(e) = framer.next_line() {
                break e;
            }
            assert!(pushed <= 1 << 20, "no error after 1 MiB");
        };
        assert_eq!(err, FrameError::TooLong(MAX_LINE));
        assert!(pushed <= MAX_LINE + chunk.len());
        // the error sticks and nothing more is buffered
        framer.push(&[b'x'; 1 << 20]);
        assert_eq!(framer.next_line(), Err(FrameError::TooLong(MAX_LINE)));
        assert!(framer.take_buffered().len() < MAX_LINE);
    }

    #[test]
    fn one_mib_push_without_lf_is_rejected() {
        let mut framer = Framer::new();
        framer.push(b"NOOP\r\n");
        framer.push(&vec![b'x'; 1 << 20]);
        assert_eq!(
            framer.next_line().map(|l| l.map(|l| l.raw.to_vec())),
            Ok(Some(b"NOOP\r\n".to_vec()))
        );
        assert_eq!(framer.next_line(), Err(FrameError::TooLong(MAX_LINE)));
        assert!(framer.take_buffered().len() < MAX_LINE);
    }

    #[test]
    fn take_buffered_keeps_unread_lines_in_order() {
        let mut framer = Framer::new();
        framer.push(b"AUTH TLS\r\n\x16\x03\x01\n\x00\xff");
        assert_eq!(
            framer.next_line().map(|l| l.map(|l| l.raw.to_vec())),
            Ok(Some(b"AUTH TLS\r\n".to_vec()))
        );
        assert_eq!(framer.take_buffered(), b"\x16\x03\x01\n\x00\xff".to_vec());
        assert_eq!(framer.next_line(), Ok(None));
        assert_eq!(framer.take_buffered(), Vec::<u8>::new());
    }

    /// Lines of arbitrary content with Telnet sequences mixed in, each with a
    /// terminator that the framer must find.
    fn arb_line() -> impl Strategy<Value = Vec<u8>> {
        let piece = prop_oneof![
            // ordinary bytes, no LF and no IAC
            proptest::collection::vec(any::<u8>(), 0..12).prop_map(|v| v
                .into_iter()
                .filter(|&b| b != b'\n' && b != IAC)
                .collect::<Vec<u8>>()),
            // `IAC x` with x not an option verb (those take a third byte)
            any::<u8>()
                .prop_filter("two-byte sequence", |x| !IAC_OPTION_VERBS.contains(x))
                .prop_map(|x| vec![IAC, x]),
            (0xFBu8..=0xFE, any::<u8>()).prop_map(|(v, x)| vec![IAC, v, x]),
            Just(b"\r".to_vec()),
        ];
        (
            proptest::collection::vec(piece, 0..6),
            prop_oneof![Just(&b"\r\n"[..]), Just(&b"\n"[..])],
        )
            .prop_map(|(pieces, end)| {
                let mut line = pieces.concat();
                line.extend_from_slice(end);
                line
            })
    }

    /// The byte-at-a-time scan the framer used before its memchr and
    /// single-copy fast paths, as a model: the lines and the error it gives
    /// for a stream fed in `chunks`.
    fn reference_frame(chunks: &[&[u8]]) -> (Vec<Vec<u8>>, bool) {
        let mut lines = Vec::new();
        let mut partial: Vec<u8> = Vec::new();
        let mut telnet = Telnet::Data;
        let mut overflow = false;
        for chunk in chunks {
            for &b in *chunk {
                if overflow {
                    break;
                }
                let ends_line = telnet == Telnet::Data && b == b'\n';
                telnet = match telnet {
                    Telnet::Command if IAC_OPTION_VERBS.contains(&b) => Telnet::Option,
                    Telnet::Data if b == IAC => Telnet::Command,
                    _ => Telnet::Data,
                };
                let len = partial.len() + 1;
                if len > MAX_LINE || (!ends_line && len == MAX_LINE) {
                    overflow = true;
                    break;
                }
                partial.push(b);
                if ends_line {
                    lines.push(std::mem::take(&mut partial));
                }
            }
        }
        (lines, overflow)
    }

    proptest! {
        #[test]
        fn word_search_finds_the_first_lf_or_iac(
            bytes in proptest::collection::vec(
                prop_oneof![any::<u8>(), Just(b'\n'), Just(IAC), Just(b'a'), Just(0xFE), Just(0x0B)],
                0..160,
            ),
        ) {
            let want = bytes.iter().position(|&b| b == b'\n' || b == IAC);
            prop_assert_eq!(find_lf_or_iac(&bytes), want);
        }

        #[test]
        fn text_fast_path_matches_the_telnet_scan(
            raw in proptest::collection::vec(
                prop_oneof![any::<u8>(), Just(b'\r'), Just(b'\n'), Just(IAC)],
                0..24,
            ),
        ) {
            let line = Line::new(&raw);
            prop_assert_eq!(line.text().into_owned(), strip_telnet(&raw));
        }

        #[test]
        fn framed_text_matches_the_telnet_scan(
            stream in proptest::collection::vec(
                prop_oneof![any::<u8>(), Just(b'\r'), Just(b'\n'), Just(IAC), Just(b'a')],
                0..200,
            ),
            step in 1usize..40,
        ) {
            // Whatever the split, the text of each framed line (which the
            // framer may already know) is what the Telnet scan gives.
            let mut framer = Framer::new();
            for chunk in stream.chunks(step) {
                framer.push(chunk);
                while let Ok(Some(line)) = framer.next_line() {
                    prop_assert_eq!(line.text().into_owned(), strip_telnet(line.raw));
                }
            }
        }

        #[test]
        fn framer_matches_the_byte_scan_model(
            pieces in proptest::collection::vec(
                prop_oneof![
                    proptest::collection::vec(
                        prop_oneof![any::<u8>(), Just(b'\n'), Just(IAC), Just(b'a')],
                        0..16,
                    ),
                    // runs long enough to reach MAX_LINE
                    (1usize..1400).prop_map(|n| vec![b'x'; n]),
                ],
                0..12,
            ),
            step in 1usize..3000,
        ) {
            let stream = pieces.concat();
            let chunks: Vec<&[u8]> = stream.chunks(step).collect();
            let (lines, err) = frame(&chunks);
            let (want_lines, want_overflow) = reference_frame(&chunks);
            prop_assert_eq!(lines, want_lines);
            prop_assert_eq!(err.is_some(), want_overflow);
        }
    }

    proptest! {
        #[test]
        fn any_split_gives_the_same_lines(
            lines in proptest::collection::vec(arb_line(), 0..8),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..10),
            tail in proptest::collection::vec(any::<u8>(), 0..4),
        ) {
            let mut stream = lines.concat();
            stream.extend(tail.iter().filter(|&&b| b != b'\n' && b != IAC));
            let mut points: Vec<usize> =
                cuts.iter().map(|c| c.index(stream.len() + 1)).collect();
            points.sort_unstable();
            let mut chunks = Vec::new();
            let mut last = 0;
            for p in points {
                chunks.push(&stream[last..p]);
                last = p;
            }
            chunks.push(&stream[last..]);

            let (whole, err) = frame(&[&stream]);
            prop_assert_eq!(err, None);
            prop_assert_eq!(&whole, &lines);
            prop_assert_eq!(frame(&chunks), (lines.clone(), None));
            let bytes: Vec<&[u8]> = stream.chunks(1).collect();
            prop_assert_eq!(frame(&bytes), (lines, None));
        }
    }
}
