//! Error classes shared by every module.
//!
//! Each module has its own error enum (`StoreError`, `ManifestError`, …) and
//! implements [`Classify`] for it; an error that wraps another module's error
//! takes that error's class. This module knows none of them: the few places that
//! must classify any error chain (the exit codes, the control protocol's error
//! replies) do it in [`crate::exit`], at the top of the library.

/// What kind of failure an error is, as far as a user or script is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// Anything not covered below.
    Other,
    /// Wrong passphrase or key file, or no usable keyslot.
    WrongKey,
    /// The parcel, version or path does not exist.
    NotFound,
    /// Someone else got there first (parcel exists, version already committed).
    Conflict,
    /// The store could not be reached (after retries).
    Unreachable,
    /// Stored data failed verification (bad chunk, corrupt manifest).
    Integrity,
    /// The request was invalid (bad name, bad path, unsupported operation).
    Invalid,
}

/// Implemented by every error enum of the library.
pub trait Classify {
    /// The class of this error.
    fn class(&self) -> ErrorClass;
}

/// `text` made safe to show on one terminal line: bytes from the store or a
/// damaged file may carry control characters (escape sequences that retitle
/// or rewrite the terminal), line breaks or bidirectional overrides. Tabs and
/// line breaks become spaces; every other such character is shown escaped
/// (`\u{1b}`); the rest is kept as it is.
pub fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\n' | '\r' | '\t' => out.push(' '),
            '\u{2028}' | '\u{2029}' | '\u{200e}' | '\u{200f}' => out.extend(c.escape_unicode()),
            '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' => out.extend(c.escape_unicode()),
            c if c.is_control() => out.extend(c.escape_unicode()),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::printable;

    #[test]
    fn printable_text_is_one_line_without_control_characters() {
        let hostile = "bad \u{1b}]0;pwned\u{7}lock\r\nsecond line\u{85}\u{2028}\u{202e}txt\u{7f}";
        let shown = printable(hostile);
        assert_eq!(
            shown,
            "bad \\u{1b}]0;pwned\\u{7}lock  second line\\u{85}\\u{2028}\\u{202e}txt\\u{7f}"
        );
        assert!(!shown.chars().any(|c| c.is_control()));
        assert_eq!(printable("plain, ünïcode ok"), "plain, ünïcode ok");
    }
}
