//! Splits a control stream into lines.
//!
//! RFC 959 §4.1 ends every command and reply with the Telnet end-of-line
//! `CR LF`; real peers also send a bare `LF`. A line ends at every `LF`,
//! always, even one that follows an `IAC`: a peer that frames on `LF` alone
//! (vsftpd does) must see the same lines as the gateway. What a line holds
//! is then read as RFC 854 says (see [`super::telnet`]); a Telnet sequence
//! cut by the line end makes a command line refused.

use std::borrow::Cow;
use std::collections::VecDeque;

use super::telnet::{self, CheckedCommand, CheckedReply, LineFault, IAC};

/// Longest line accepted, terminator included. RFC 959 commands are short;
/// this leaves room for long paths while bounding memory per session.
pub const MAX_LINE: usize = 4096;

/// Buffer room a drained framer keeps; more (after a burst of pipelined
/// lines, or a long line) is freed, so an idle session holds little.
const SPARE_BYTES: usize = 256;
/// Line ends a drained framer keeps room for.
const SPARE_LINES: usize = 16;

/// One framed line, lent by [`Framer::next_line`] until the framer is used
/// again. Its bytes as received are never sent on: [`Line::command`] and
/// [`Line::reply`] give what the gateway checks and writes.
#[derive(Debug, Clone, Copy)]
pub struct Line<'a> {
    /// The bytes exactly as received, terminator and Telnet sequences included.
    raw: &'a [u8],
    /// Length of the text when the framer saw no CR (but the terminator's),
    /// NUL or IAC in the line, so that the text is a prefix of `raw` and
    /// needs no second look; `None`: not known.
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
    /// A line over `raw`, as received; it ends at its first LF, if any.
    pub fn new(raw: &'a [u8]) -> Self {
        Line {
            raw,
            text_len: None,
        }
    }

    /// The bytes as received, terminator included: for tests and checks
    /// only, never to be forwarded.
    pub fn as_received(&self) -> &'a [u8] {
        self.raw
    }

    /// The line without its terminator (`LF`, and a `CR` just before it).
    fn body(&self) -> &'a [u8] {
        let raw = self.raw;
        let line = match memchr::memchr(b'\n', raw) {
            Some(lf) => &raw[..lf],
            None => raw,
        };
        line.strip_suffix(b"\r").unwrap_or(line)
    }

    /// The text known without a second look, if the framer saw it plain.
    fn plain(&self) -> Option<&'a [u8]> {
        self.text_len.and_then(|n| self.raw.get(..usize::from(n)))
    }

    /// The line's text: terminator removed and Telnet IAC sequences decoded
    /// (`IAC IAC` becomes one 0xFF byte, any other sequence is dropped, a
    /// cut one too). Nothing is refused or replaced here: use
    /// [`Line::command`] or [`Line::reply`] for what is forwarded.
    ///
    /// `RETR a\xff\xffb\r\n` → `RETR a\xffb`; `\xff\xf4\xff\xf2ABOR\r\n`
    /// (IAC IP, IAC DM — RFC 959 §4.1.3) → `ABOR`.
    ///
    /// Borrowed from the line unless it holds an IAC.
    pub fn text(&self) -> Cow<'a, [u8]> {
        if let Some(text) = self.plain() {
            return Cow::Borrowed(text);
        }
        let body = self.body();
        if memchr::memchr(IAC, body).is_none() {
            return Cow::Borrowed(body);
        }
        Cow::Owned(telnet::decode(body).text)
    }

    /// The line read as a client command: its checked text, or why it is
    /// refused (a CR or NUL inside it, or a Telnet sequence cut by its end).
    ///
    /// `NOOP\xff\n` → `Err(CutTelnet)`; `NOOP\rDELE x\r\n` → `Err(Cr)`.
    pub fn command(&self) -> Result<CheckedCommand, LineFault> {
        match self.plain() {
            Some(text) => Ok(CheckedCommand::plain(text)),
            None => CheckedCommand::check(telnet::decode(self.body())),
        }
    }

    /// The line read as a server reply line: Telnet decoded, each CR or NUL
    /// inside replaced by a space.
    ///
    /// `227 a\rb\r\n` → `227 a b`.
    pub fn reply(&self) -> CheckedReply {
        match self.plain() {
            Some(text) => CheckedReply::plain(text),
            None => CheckedReply::check(telnet::decode(self.body())),
        }
    }
}

/// The text of a plain line (no IAC, NUL, or CR but the terminator's): the
/// line without its LF and a CR just before it.
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

/// The first LF, CR, NUL or IAC in `bytes`: the bytes that end a line or
/// make its text need a closer look. Searched eight at a time in a u64; a
/// control line is too short for a vector search's set-up to pay.
fn find_special(bytes: &[u8]) -> Option<usize> {
    const ONES: u64 = u64::from_le_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_le_bytes([0x80; 8]);
    const LFS: u64 = u64::from_le_bytes([b'\n'; 8]);
    const CRS: u64 = u64::from_le_bytes([b'\r'; 8]);
    /// High bit set in each byte of the result at or after the first zero
    /// byte of `v`, and the lowest one exactly there.
    fn zero_bytes(v: u64) -> u64 {
        v.wrapping_sub(ONES) & !v & HIGHS
    }
    let mut words = bytes.chunks_exact(8);
    let mut at = 0;
    for word in &mut words {
        let x = u64::from_le_bytes(<[u8; 8]>::try_from(word).unwrap_or_default());
        // Each wanted byte becomes zero in one of these; the lowest hit of
        // each is exact, so the lowest of all is the first wanted byte.
        let hits = zero_bytes(x ^ LFS) | zero_bytes(x ^ CRS) | zero_bytes(x) | zero_bytes(!x);
        if hits != 0 {
            return Some(at + (hits.trailing_zeros() / 8) as usize);
        }
        at += 8;
    }
    words
        .remainder()
        .iter()
        .position(|&b| matches!(b, b'\n' | b'\r' | 0 | IAC))
        .map(|i| at + i)
}

/// A framing violation: the session must be closed after a 500.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// More than [`MAX_LINE`] bytes arrived without a line end.
    #[error("line longer than {0} bytes")]
    TooLong(usize),
}

/// Incremental line framer. Feed it any split of the stream; it yields the
/// same lines. Ends a line at every LF (CRLF or bare LF); Telnet sequences
/// are the concern of the line's reader, not of the framing.
///
/// Bytes are scanned once, as they are pushed, so byte-at-a-time input costs
/// O(n); the scan also notes whether a line is plain text, so that most
/// lines need no second look. A partial line never holds more than
/// [`MAX_LINE`] bytes: once it would, the framer reports
/// [`FrameError::TooLong`] after the lines completed before it, and drops
/// further input.
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
    /// The line being received holds a NUL or an IAC, or a CR that is not
    /// directly before its LF: its text needs the Telnet decode and checks.
    dirty: bool,
    /// Position in the line being received of its last CR, while it may
    /// still be the CR of a CR LF.
    cr_at: Option<usize>,
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
    pub fn push(&mut self, bytes: &[u8]) {
        if self.ends.is_empty() && self.read != 0 {
            // The last line taken is no longer lent.
            self.drained();
        }
        if self.overflow {
            return;
        }
        // Room for every line this segment may complete, at once: its
        // bytes, and line ends for lines of 16 bytes or more (regrowing the
        // queue line by line costs more than the spare room).
        self.ready.reserve(bytes.len());
        self.ends.reserve(bytes.len().min(MAX_LINE) / 16);
        // Start, in `bytes`, of the line being received.
        let mut start = 0;
        let mut pos = 0;
        while let Some(i) = bytes.get(pos..).and_then(find_special) {
            let at = pos + i;
            let b = bytes[at];
            let line_pos = self.partial.len() + (at - start);
            if let Some(cr) = self.cr_at.take() {
                if b != b'\n' || line_pos != cr + 1 {
                    self.dirty = true;
                }
            }
            match b {
                b'\n' => {
                    if line_pos >= MAX_LINE {
                        self.overflow = true;
                        return;
                    }
                    self.end_line(&bytes[start..=at]);
                    start = at + 1;
                }
                b'\r' => self.cr_at = Some(line_pos),
                _ => self.dirty = true,
            }
            pos = at + 1;
        }
        // A line may be `MAX_LINE` bytes with its terminator, so an
        // unterminated partial line of `MAX_LINE` bytes can never end in time.
        let rest = bytes.get(start..).unwrap_or_default();
        if self.partial.len() + rest.len() >= MAX_LINE {
            self.overflow = true;
            return;
        }
        self.partial.extend_from_slice(rest);
    }

    /// Ends the line being received with `tail`, its last bytes up to and
    /// including the LF.
    fn end_line(&mut self, tail: &[u8]) {
        let clean = !self.dirty;
        if self.partial.is_empty() {
            // The whole line is in this segment: straight to the ready lines.
            self.complete(tail, clean);
        } else {
            self.partial.extend_from_slice(tail);
            let partial = std::mem::take(&mut self.partial);
            self.complete(&partial, clean);
            if partial.capacity() <= SPARE_BYTES {
                self.partial = partial;
                self.partial.clear();
            }
        }
        self.dirty = false;
    }

    /// Queues one terminated line; `clean` when it is plain text.
    fn complete(&mut self, line: &[u8], clean: bool) {
        self.ready.extend_from_slice(line);
        let text_len = if clean {
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
    pub(crate) fn lines_completed(&self) -> u64 {
        self.completed
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
    pub(crate) fn take_buffered(&mut self) -> Vec<u8> {
        let mut out = self.ready.split_off(self.read);
        self.ends.clear();
        self.drained();
        out.append(&mut self.partial);
        self.dirty = false;
        self.cr_at = None;
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
                    Ok(Some(line)) => lines.push(line.as_received().to_vec()),
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
            // NUL is an ordinary byte to the framer
            (b"RETR a\0b\r\n", &[b"RETR a\0b\r\n"], b""),
            // Every LF ends a line, even right after IAC or IAC DO: a peer
            // that frames on LF alone sees two lines here, and so does
            // the gateway (the first is then refused as a cut sequence).
            (b"A\xff\nB\r\n", &[b"A\xff\n", b"B\r\n"], b""),
            (b"A\xff\xfd\nB\n", &[b"A\xff\xfd\n", b"B\n"], b""),
            (b"A\xff\xff\nB\n", &[b"A\xff\xff\n", b"B\n"], b""),
            // IAC at the end is just buffered
            (b"A\xff", &[], b"A\xff"),
            (b"A\xff\xfb", &[], b"A\xff\xfb"),
        ];
        for (input, want_lines, want_rest) in cases {
            let mut framer = Framer::new();
            framer.push(input);
            let mut got = Vec::new();
            while let Ok(Some(line)) = framer.next_line() {
                got.push(line.as_received().to_vec());
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
            // IAC WILL x is three bytes, whatever x is but LF
            (b"NO\xff\xfb\rOP\r\n", b"NOOP"),
            (b"NO\xff\xfe\xffOP\r\n", b"NOOP"),
            // the line ends at its first LF, whatever comes before it
            (b"NO\xff\xfb\nOP\r\n", b"NO"),
            // IAC CR LF: the terminator is taken first; the IAC is cut
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
    fn smuggling_lines_are_refused_as_commands() {
        // Each input, then for each line it frames into: the bytes sent to
        // the server, or the fault that refuses it.
        type Case = (&'static [u8], &'static [Result<&'static [u8], LineFault>]);
        let cases: &[Case] = &[
            (
                b"NOOP\xff\nDELE x\r\n",
                &[Err(LineFault::CutTelnet), Ok(b"DELE x\r\n")],
            ),
            (
                b"NOOP\xff\xfb\nPORT 1,2,3,4,5,6\r\n",
                &[Err(LineFault::CutTelnet), Ok(b"PORT 1,2,3,4,5,6\r\n")],
            ),
            (b"NOOP\rDELE x\r\n", &[Err(LineFault::Cr)]),
            (b"NOOP\xff\r\n", &[Err(LineFault::CutTelnet)]),
            (b"RETR a\0b\r\n", &[Err(LineFault::Nul)]),
            (b"RETR a\xff\xffb\n", &[Ok(b"RETR a\xff\xffb\r\n")]),
            (
                b"\xff\xf4\xff\xf2ABOR\r\n",
                &[Ok(b"\xff\xf4\xff\xf2ABOR\r\n")],
            ),
            (b"USER a\n", &[Ok(b"USER a\r\n")]),
        ];
        for (input, want) in cases {
            let mut framer = Framer::new();
            framer.push(input);
            let mut got = Vec::new();
            while let Ok(Some(line)) = framer.next_line() {
                got.push(line.command().map(|c| c.to_wire()));
            }
            let want: Vec<_> = want.iter().map(|w| w.map(<[u8]>::to_vec)).collect();
            assert_eq!(got, want, "input {input:?}");
        }
    }

    #[test]
    fn hidden_reply_lines_stay_inside_their_line() {
        let mut framer = Framer::new();
        framer.push(b"200 ok\xff\n227 Entering Passive Mode (10,0,0,9,1,1)\r\n200 a\r227 b\r\n");
        let mut got = Vec::new();
        while let Ok(Some(line)) = framer.next_line() {
            got.push(line.reply().to_wire());
        }
        assert_eq!(
            got,
            [
                &b"200 ok\r\n"[..],
                b"227 Entering Passive Mode (10,0,0,9,1,1)\r\n",
                b"200 a 227 b\r\n"
            ]
        );
    }

    #[test]
    fn word_search_at_every_position() {
        for len in 0..150 {
            for at in 0..len {
                for hit in [b'\n', b'\r', 0, IAC] {
                    let mut bytes = vec![b'a'; len];
                    bytes[at] = hit;
                    assert_eq!(find_special(&bytes), Some(at), "len {len} at {at}");
                }
            }
            assert_eq!(find_special(&vec![0xFE; len]), None, "len {len}");
        }
    }

    #[test]
    fn byte_at_a_time_matches_one_push() {
        let stream: &[u8] = b"USER a\r\n\xff\xf4\xff\xf2ABOR\r\nRETR \xff\xff\n\xff\xfd\nX\r\nPAS";
        let whole = frame(&[stream]);
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(frame(&bytes), whole);
        assert_eq!(whole.0.len(), 5);
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
            framer
                .next_line()
                .map(|l| l.map(|l| l.as_received().to_vec())),
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
            framer
                .next_line()
                .map(|l| l.map(|l| l.as_received().to_vec())),
            Ok(Some(b"AUTH TLS\r\n".to_vec()))
        );
        assert_eq!(framer.take_buffered(), b"\x16\x03\x01\n\x00\xff".to_vec());
        assert_eq!(framer.next_line(), Ok(None));
        assert_eq!(framer.take_buffered(), Vec::<u8>::new());
    }

    /// Lines of arbitrary content with Telnet sequences mixed in, each with a
    /// terminator that the framer must find.
    fn arb_line() -> impl Strategy<Value = Vec<u8>> {
        let no_lf = any::<u8>().prop_filter("not LF", |&b| b != b'\n');
        let piece = prop_oneof![
            // ordinary bytes, no LF
            proptest::collection::vec(no_lf.clone(), 0..12),
            // Telnet sequences, none holding an LF
            no_lf.clone().prop_map(|x| vec![IAC, x]),
            (0xFBu8..=0xFE, no_lf).prop_map(|(v, x)| vec![IAC, v, x]),
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

    /// A byte-at-a-time framer, as a model: the lines and the error it gives
    /// for a stream fed in `chunks`.
    fn reference_frame(chunks: &[&[u8]]) -> (Vec<Vec<u8>>, bool) {
        let mut lines = Vec::new();
        let mut partial: Vec<u8> = Vec::new();
        for chunk in chunks {
            for &b in *chunk {
                let ends_line = b == b'\n';
                let len = partial.len() + 1;
                if len > MAX_LINE || (!ends_line && len == MAX_LINE) {
                    return (lines, true);
                }
                partial.push(b);
                if ends_line {
                    lines.push(std::mem::take(&mut partial));
                }
            }
        }
        (lines, false)
    }

    /// Bytes that matter to framing and Telnet, and some that do not.
    fn wire_byte() -> impl Strategy<Value = u8> {
        prop_oneof![
            any::<u8>(),
            Just(b'\n'),
            Just(b'\r'),
            Just(0),
            Just(IAC),
            Just(IAC),
            Just(0xF4),
            Just(0xF2),
            Just(0xFB),
            Just(b'a'),
            Just(b'2'),
            Just(b' '),
        ]
    }

    /// How a peer that frames on LF alone (vsftpd) splits `stream`: each
    /// line without its LF and a CR before it; bytes after the last LF are
    /// left over.
    fn split_lf(stream: &[u8]) -> (Vec<Vec<u8>>, Vec<u8>) {
        let mut parts: Vec<Vec<u8>> = stream.split(|&b| b == b'\n').map(<[u8]>::to_vec).collect();
        let rest = parts.pop().unwrap_or_default();
        for p in &mut parts {
            if p.last() == Some(&b'\r') {
                p.pop();
            }
        }
        (parts, rest)
    }

    /// How a peer that frames on CR LF only splits `stream`.
    fn split_crlf(stream: &[u8]) -> (Vec<Vec<u8>>, Vec<u8>) {
        let mut lines = Vec::new();
        let mut start = 0;
        let mut i = 0;
        while i + 1 < stream.len() {
            if stream[i] == b'\r' && stream[i + 1] == b'\n' {
                lines.push(stream[start..i].to_vec());
                start = i + 2;
                i += 2;
            } else {
                i += 1;
            }
        }
        (lines, stream[start..].to_vec())
    }

    /// How a Telnet-aware peer splits `stream`: RFC 854 decode first, byte
    /// by byte (IAC IAC is 0xFF, IAC WILL/WONT/DO/DONT x and IAC x are
    /// commands), then lines at LF, without a CR before it.
    fn split_telnet(stream: &[u8]) -> (Vec<Vec<u8>>, Vec<u8>) {
        let mut data = Vec::new();
        let mut i = 0;
        while i < stream.len() {
            match (stream[i], stream.get(i + 1)) {
                (IAC, Some(&IAC)) => {
                    data.push(IAC);
                    i += 2;
                }
                (IAC, Some(0xFB..=0xFE)) => i += 3,
                (IAC, _) => i += 2,
                (b, _) => {
                    data.push(b);
                    i += 1;
                }
            }
        }
        split_lf(&data)
    }

    /// Asserts that `wire`, the lines the gateway wrote for `texts`, reads
    /// as exactly those lines under each framing a real peer uses.
    fn same_lines_under_every_framing(wire: &[u8], texts: &[Vec<u8>]) -> Result<(), TestCaseError> {
        let (lf, lf_rest) = split_lf(wire);
        let (crlf, crlf_rest) = split_crlf(wire);
        let (telnet, telnet_rest) = split_telnet(wire);
        prop_assert!(lf_rest.is_empty() && crlf_rest.is_empty() && telnet_rest.is_empty());
        prop_assert_eq!(&lf, &crlf, "LF and CRLF framing differ");
        prop_assert_eq!(&telnet, texts, "Telnet-aware framing differs");
        for (line, text) in lf.iter().zip(texts) {
            // The same line, read by the gateway's own Telnet decoder.
            let decoded = telnet::decode(line);
            prop_assert_eq!(&decoded.text, text);
            prop_assert!(!decoded.cut);
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn word_search_finds_the_first_special_byte(
            bytes in proptest::collection::vec(
                prop_oneof![any::<u8>(), Just(b'\n'), Just(b'\r'), Just(0), Just(IAC), Just(b'a'), Just(0xFE), Just(0x0B)],
                0..160,
            ),
        ) {
            let want = bytes.iter().position(|&b| matches!(b, b'\n' | b'\r' | 0 | IAC));
            prop_assert_eq!(find_special(&bytes), want);
        }

        #[test]
        fn framed_lines_read_as_the_unframed_lines(
            stream in proptest::collection::vec(wire_byte(), 0..200),
            step in 1usize..40,
        ) {
            // Whatever the split, what the framer knows of a line without a
            // second look is what a full read of its bytes gives.
            let mut framer = Framer::new();
            for chunk in stream.chunks(step) {
                framer.push(chunk);
                while let Ok(Some(line)) = framer.next_line() {
                    let unframed = Line::new(line.as_received());
                    prop_assert_eq!(line.text(), unframed.text());
                    prop_assert_eq!(line.command(), unframed.command());
                    prop_assert_eq!(line.reply(), unframed.reply());
                }
            }
        }

        #[test]
        fn framer_matches_the_byte_scan_model(
            pieces in proptest::collection::vec(
                prop_oneof![
                    proptest::collection::vec(wire_byte(), 0..16),
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

        /// The differential: whatever a client sends, the commands the
        /// gateway writes split, under LF, CRLF and Telnet-aware framing,
        /// into exactly the lines it checked; none of them holds CR, LF or NUL.
        #[test]
        fn commands_written_are_the_lines_checked(
            stream in proptest::collection::vec(wire_byte(), 0..300),
            step in 1usize..40,
        ) {
            let mut framer = Framer::new();
            let mut wire = Vec::new();
            let mut texts = Vec::new();
            for chunk in stream.chunks(step) {
                framer.push(chunk);
                while let Ok(Some(line)) = framer.next_line() {
                    if let Ok(cmd) = line.command() {
                        prop_assert!(!cmd.text().iter().any(|b| matches!(b, b'\r' | b'\n' | 0)));
                        wire.extend_from_slice(&cmd.to_wire());
                        texts.push(cmd.text().to_vec());
                    }
                }
            }
            same_lines_under_every_framing(&wire, &texts)?;
        }

        /// The same for replies, inner lines of multi-line replies included:
        /// none is dropped, and none becomes two.
        #[test]
        fn replies_written_are_the_lines_checked(
            stream in proptest::collection::vec(wire_byte(), 0..300),
            step in 1usize..40,
            inner in any::<bool>(),
        ) {
            let mut framer = Framer::new();
            let mut wire = Vec::new();
            let mut texts = Vec::new();
            for chunk in stream.chunks(step) {
                framer.push(chunk);
                while let Ok(Some(line)) = framer.next_line() {
                    let reply = line.reply();
                    let (bytes, text) = if inner {
                        let bytes = reply.inner_wire(211);
                        let padded = bytes.len() > reply.to_wire().len();
                        let mut text = if padded { vec![b' '] } else { Vec::new() };
                        text.extend_from_slice(reply.text());
                        // A padded line never starts with a digit.
                        prop_assert!(!bytes.first().is_some_and(u8::is_ascii_digit) || bytes.starts_with(b"211-"));
                        (bytes, text)
                    } else {
                        (reply.to_wire(), reply.text().to_vec())
                    };
                    wire.extend_from_slice(&bytes);
                    texts.push(text);
                }
            }
            prop_assert_eq!(texts.len() as u64, framer.lines_completed());
            same_lines_under_every_framing(&wire, &texts)?;
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
            stream.extend(tail.iter().filter(|&&b| b != b'\n'));
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
