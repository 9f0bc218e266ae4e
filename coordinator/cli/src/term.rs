//! The terminal: raw mode for the interactive console, and the one place where a guest's
//! terminal control sequences are removed from output that is not a live terminal session.

use std::io::{IsTerminal, Write};

use nix::sys::termios::{self, SetArg, Termios};

/// Ctrl-]: detaches from the interactive console (as in `virsh console` and telnet).
pub const DETACH: u8 = 0x1d;

/// Whether both stdin and stdout are terminals (an interactive console needs both).
pub fn interactive() -> bool {
    std::io::stdin().is_terminal() && std::io::stdout().is_terminal()
}

/// Stdin in raw mode (every byte as typed, no echo, no signals from Ctrl-C or Ctrl-Z: they
/// are the guest's) until dropped, when the modes it had are put back; dropping happens
/// on every way out, an error or a panic's unwinding included.
#[derive(Debug)]
pub struct RawMode {
    saved: Termios,
}

impl RawMode {
    pub fn enable() -> nix::Result<Self> {
        let stdin = std::io::stdin();
        let saved = termios::tcgetattr(&stdin)?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(&stdin, SetArg::TCSANOW, &raw)?;
        Ok(Self { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // Nothing more can be done if the terminal is gone (a hang-up).
        let _ = termios::tcsetattr(std::io::stdin(), SetArg::TCSANOW, &self.saved);
    }
}

/// Removes terminal control from a byte stream: escape sequences (CSI `ESC [ ... final`,
/// OSC `ESC ] ... BEL|ST`, DCS/SOS/PM/APC strings, and two- or three-byte `ESC` sequences)
/// and every other control character but `\n` and `\t` (`\r` included: lines end in `\n`).
/// A sequence split across two calls of [`Stripper::feed`] is removed all the same.
#[derive(Clone, Debug, Default)]
pub struct Stripper {
    state: State,
    /// Bytes of the string sequence under way: one never terminated ends at a bound, so a
    /// stray `ESC ]` cannot hide the rest of a console.
    in_string: usize,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum State {
    #[default]
    Ground,
    Esc,
    EscIntermediate,
    Csi,
    Str,
    StrEsc,
}

/// Longest string sequence (OSC, DCS...) removed as one.
const MAX_STRING: usize = 4096;

impl Stripper {
    /// Appends what of `input` is text to `out`.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) {
        for &b in input {
            self.byte(b, out);
        }
    }

    fn byte(&mut self, b: u8, out: &mut Vec<u8>) {
        const ESC: u8 = 0x1b;
        const CAN: u8 = 0x18;
        const SUB: u8 = 0x1a;
        match self.state {
            State::Ground => match b {
                ESC => self.state = State::Esc,
                b'\n' | b'\t' => out.push(b),
                0..=0x1f | 0x7f => {}
                _ => out.push(b),
            },
            State::Esc => match b {
                b'[' => self.state = State::Csi,
                b']' | b'P' | b'X' | b'^' | b'_' => {
                    self.state = State::Str;
                    self.in_string = 0;
                }
                0x20..=0x2f => self.state = State::EscIntermediate,
                ESC => {}
                _ => self.state = State::Ground,
            },
            State::EscIntermediate => match b {
                0x20..=0x2f => {}
                ESC => self.state = State::Esc,
                _ => self.state = State::Ground,
            },
            State::Csi => match b {
                0x40..=0x7e | CAN | SUB => self.state = State::Ground,
                ESC => self.state = State::Esc,
                _ => {}
            },
            State::Str => match b {
                0x07 | CAN | SUB => self.state = State::Ground,
                ESC => self.state = State::StrEsc,
                _ if self.in_string >= MAX_STRING => {
                    self.state = State::Ground;
                    self.byte(b, out);
                }
                _ => self.in_string += 1,
            },
            State::StrEsc => match b {
                b'\\' => self.state = State::Ground,
                // ESC then anything else ends the string and starts a new sequence.
                _ => {
                    self.state = State::Esc;
                    self.byte(b, out);
                }
            },
        }
    }
}

/// The text of `bytes`, control sequences removed.
pub fn strip(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    Stripper::default().feed(bytes, &mut out);
    out
}

/// A writer that removes control sequences from what goes through it.
#[derive(Debug)]
pub struct StripWriter<W> {
    inner: W,
    stripper: Stripper,
    buf: Vec<u8>,
}

impl<W: Write> StripWriter<W> {
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            stripper: Stripper::default(),
            buf: Vec::new(),
        }
    }
}

impl<W: Write> Write for StripWriter<W> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.clear();
        self.stripper.feed(data, &mut self.buf);
        self.inner.write_all(&self.buf)?;
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sequences_and_controls_go_text_stays() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"plain text\n", b"plain text\n"),
            (b"\x1b[1;31mred\x1b[0m\r\n", b"red\n"),
            (b"\x1b[?2004hprompt# ", b"prompt# "),
            (b"\x1b]0;title\x07after", b"after"),
            (b"\x1b]8;;http://x\x1b\\link\x1b]8;;\x1b\\", b"link"),
            (b"\x1bPq#0;2;0;0;0\x1b\\dcs", b"dcs"),
            (b"\x1b(Bcharset\x1b=keypad\x1b7", b"charsetkeypad"),
            (b"tab\there\x08\x07\x00\x7f", b"tab\there"),
            (b"\x1b[2J\x1b[H\x1b[K", b""),
            ("漢字 ü\n".as_bytes(), "漢字 ü\n".as_bytes()),
            // CAN cancels a sequence; ESC inside one starts another.
            (b"\x1b[12\x18x\x1b[1\x1b[mY", b"xY"),
        ];
        for (input, want) in cases {
            assert_eq!(strip(input), *want, "{:?}", String::from_utf8_lossy(input));
        }
    }

    #[test]
    fn an_unterminated_string_ends_at_its_bound() {
        let mut input = b"\x1b]".to_vec();
        input.extend(std::iter::repeat_n(b'x', MAX_STRING));
        input.extend(b"seen");
        assert_eq!(strip(&input), b"seen");
    }

    fn sequence() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            "[0-9;?]{0,8}[@-~]".prop_map(|s| [b"\x1b[", s.as_bytes()].concat()),
            "[ -~]{0,40}".prop_map(|s| [b"\x1b]", s.as_bytes(), b"\x07"].concat()),
            "[ -~&&[^\\x1b]]{0,40}".prop_map(|s| [b"\x1bP", s.as_bytes(), b"\x1b\\"].concat()),
            "[ -/]{1,2}[0-~]".prop_map(|s| [b"\x1b", s.as_bytes()].concat()),
            "[0-9A-OQ-WYZa-z]".prop_map(|s| [b"\x1b", s.as_bytes()].concat()),
            prop::sample::select(vec![b"\r".to_vec(), b"\x07".to_vec(), b"\x08".to_vec()]),
        ]
    }

    proptest! {
        /// Whatever comes in, no control byte but `\n` and `\t` goes out, and splitting
        /// the input anywhere changes nothing.
        #[test]
        fn output_has_no_controls_and_splits_do_not_matter(
            bytes in proptest::collection::vec(any::<u8>(), 0..600),
            cut in any::<prop::sample::Index>(),
        ) {
            let whole = strip(&bytes);
            prop_assert!(whole.iter().all(|&b| b >= 0x20 && b != 0x7f || b == b'\n' || b == b'\t'));
            let c = cut.index(bytes.len() + 1);
            let mut s = Stripper::default();
            let mut parts = Vec::new();
            s.feed(&bytes[..c], &mut parts);
            s.feed(&bytes[c..], &mut parts);
            prop_assert_eq!(parts, whole);
        }

        /// Text between sequences comes out whole, in order.
        #[test]
        fn text_between_sequences_survives(
            pieces in proptest::collection::vec(("[ -~\n\t]{0,20}", sequence()), 0..10),
        ) {
            let mut input = Vec::new();
            let mut want: Vec<u8> = Vec::new();
            for (text, seq) in &pieces {
                input.extend(text.as_bytes());
                want.extend(text.as_bytes());
                input.extend(seq);
            }
            prop_assert_eq!(strip(&input), want);
        }
    }
}
