//! Peer-controlled text in log lines.
//!
//! User names, paths, verbs and reply text come from the peers. The text log
//! format prints a field as `key=value` with the value as it is, so a control
//! byte would reach the operator's terminal, and a value holding ` user=root`
//! would read as a second field. [`Escaped`] prints a value so that neither
//! can happen: every `=` in a text log line then separates a real field.
//! The JSON format escapes strings itself, so there a value is printed
//! unchanged (see [`set_json`]).

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};

static JSON: AtomicBool = AtomicBool::new(false);

/// Declares that log lines are JSON (set once, at startup): serde escapes
/// every string there, and a second escape would only alter the value.
pub fn set_json(json: bool) {
    JSON.store(json, Ordering::Relaxed);
}

/// A peer-controlled value for a log field, used as `%Escaped(&s)`.
///
/// In text logs: `\` → `\\`; `=`, `"` and ASCII control bytes → `\xNN`;
/// other control and invisible formatting characters (C1 controls, bidi
/// overrides, zero-width and line/paragraph separators) → `\u{NNNN}`.
/// Spaces and other printable text stay as they are.
///
/// `a\x1b[31m user=root` → `a\x1b[31m user\x3droot`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Escaped<'a>(pub &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0;
        if JSON.load(Ordering::Relaxed) {
            return f.write_str(s);
        }
        let mut start = 0;
        for (i, c) in s.char_indices() {
            if !needs_escape(c) {
                continue;
            }
            f.write_str(&s[start..i])?;
            match c {
                '\\' => f.write_str("\\\\")?,
                c if c.is_ascii() => write!(f, "\\x{:02x}", c as u32)?,
                c => write!(f, "\\u{{{:04x}}}", c as u32)?,
            }
            start = i + c.len_utf8();
        }
        f.write_str(&s[start..])
    }
}

fn needs_escape(c: char) -> bool {
    matches!(c, '\\' | '=' | '"')
        || c.is_control()
        // Invisible characters that reorder or hide text on display.
        || matches!(c, '\u{061c}' | '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}'
            | '\u{2060}'..='\u{2069}' | '\u{feff}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_table() {
        for (input, want) in [
            ("anonymous", "anonymous"),
            ("a file.bin", "a file.bin"),
            ("Müller/日本", "Müller/日本"),
            ("", ""),
            ("a\x1b[31m user=root", "a\\x1b[31m user\\x3droot"),
            ("x\r\ny", "x\\x0d\\x0ay"),
            ("nul\0", "nul\\x00"),
            ("del\x7f", "del\\x7f"),
            ("back\\slash", "back\\\\slash"),
            // An escape sequence sent by the peer stays distinct from ours.
            ("\\x1b", "\\\\x1b"),
            ("say \"hi\"", "say \\x22hi\\x22"),
            ("\u{9b}2J", "\\u{009b}2J"),
            ("evil\u{202e}txt.exe", "evil\\u{202e}txt.exe"),
            ("line\u{2028}sep", "line\\u{2028}sep"),
        ] {
            assert_eq!(Escaped(input).to_string(), want, "{input:?}");
        }
    }

    #[test]
    fn escaped_text_has_no_control_and_no_equals() {
        let all: String = (0u32..0x3000).filter_map(char::from_u32).collect();
        let out = Escaped(&all).to_string();
        assert!(!out.contains('='));
        assert!(!out.chars().any(|c| c.is_control()));
    }
}
