//! RFC 5424 messages, written by hand:
//!
//! `<PRI>1 TIMESTAMP HOSTNAME cage PROCID MSGID [cage@32473 name="value" …][meta
//! sequenceId="N"] BOM MSG`
//!
//! Every field a caged host can influence (a DHCP hostname, a DNS name, an audit line's
//! reason) ends up in a PARAM-VALUE or in MSG, never in a header field: values are
//! escaped as §6.3.3 says (`"`, `\` and `]` get a backslash), control characters
//! (newlines, NUL, …) are replaced by U+FFFD so that no value can start a line of its
//! own in a collector's file, and every part has a length cap so the whole message fits
//! in [`MAX_LEN`] octets.

use std::fmt::Write as _;
use std::time::SystemTime;

use crate::events::Event;

/// The SD-ID of Cage's structured data. 32473 is the private enterprise number IANA
/// reserves for documentation (RFC 5612); a deployment with a number of its own would
/// change only this.
pub const SD_ID: &str = "cage@32473";

/// The facility of every message: `daemon` (3).
pub const FACILITY: u8 = 3;

/// The longest message Cage sends, in octets: RFC 5425 and 5426 receivers must take
/// 2048 (UDP: the datagram stays under common MTUs' reassembly limits).
pub const MAX_LEN: usize = 2048;

/// The longest PARAM-VALUE, in octets before escaping.
pub const MAX_VALUE: usize = 256;

/// At most this many params in Cage's SD-ELEMENT; the rest are left out and counted.
pub const MAX_PARAMS: usize = 24;

/// The RFC 5424 header fields that stay the same for the daemon's life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// HOSTNAME: the router's (from `/proc/sys/kernel/hostname`), made printable ASCII.
    pub hostname: String,
    /// PROCID: `cage run`'s pid.
    pub procid: u32,
}

impl Origin {
    pub fn new(hostname: &str, procid: u32) -> Origin {
        Origin {
            hostname: header_field(hostname, 255),
            procid,
        }
    }

    /// The router's hostname as the kernel has it.
    pub fn this_router() -> Origin {
        let name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        Origin::new(name.trim(), std::process::id())
    }
}

/// A header field (HOSTNAME): printable US-ASCII without spaces (RFC 5424 §6), at most
/// `max` characters, `-` (the NILVALUE) when nothing is left.
fn header_field(s: &str, max: usize) -> String {
    let out: String = s
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(max)
        .collect();
    if out.is_empty() {
        "-".into()
    } else {
        out
    }
}

/// An SD-NAME (PARAM-NAME): 1 to 32 printable US-ASCII characters except `=`, space,
/// `]` and `"`. Cage's own names are; a name from an audit line is made so, the
/// characters that may not be there replaced by `_`.
pub fn sd_name(s: &str) -> String {
    let out: String = s
        .chars()
        .take(32)
        .map(|c| {
            if c.is_ascii_graphic() && !matches!(c, '=' | ']' | '"') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.is_empty() {
        "_".into()
    } else {
        out
    }
}

/// `s` cut to at most `max` octets, on a character boundary.
fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn is_control(c: char) -> bool {
    c.is_control() || c == '\u{2028}' || c == '\u{2029}'
}

/// A PARAM-VALUE: at most [`MAX_VALUE`] octets of `s`, control characters replaced,
/// `"`, `\` and `]` escaped with a backslash (§6.3.3).
pub fn escape_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len().min(MAX_VALUE) + 8);
    for c in cut(s, MAX_VALUE).chars() {
        match c {
            '"' | '\\' | ']' => {
                out.push('\\');
                out.push(c);
            }
            c if is_control(c) => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

/// MSG: control characters replaced, cut to `max` octets.
fn clean_msg(s: &str, max: usize) -> String {
    let clean: String = s
        .chars()
        .map(|c| if is_control(c) { '\u{FFFD}' } else { c })
        .collect();
    cut(&clean, max).to_owned()
}

/// The message for `e`, sent at `at` as number `seq` (RFC 5424's `meta sequenceId`,
/// 1 to 2147483647, so a collector sees the gaps the queue left).
pub fn message(origin: &Origin, e: &Event, at: SystemTime, seq: u32) -> Vec<u8> {
    let pri = u16::from(FACILITY) * 8 + e.severity as u16;
    let mut head = format!(
        "<{pri}>1 {} {} cage {} {} ",
        crate::clock::rfc3339(at),
        origin.hostname,
        origin.procid,
        e.kind.msgid()
    );
    let meta = format!("[meta sequenceId=\"{seq}\"]");
    // Room for the SD-ELEMENT: the whole message minus header, meta, BOM and a little
    // MSG; params that do not fit are left out and counted in `cut`.
    let room = MAX_LEN.saturating_sub(head.len() + meta.len() + 3 + 64 + 16);
    let mut sd = format!("[{SD_ID}");
    let mut left_out = e.params.len().saturating_sub(MAX_PARAMS);
    for (name, value) in e.params.iter().take(MAX_PARAMS) {
        let param = format!(" {}=\"{}\"", sd_name(name), escape_value(value));
        if sd.len() + param.len() + 1 > room {
            left_out += 1;
            continue;
        }
        sd.push_str(&param);
    }
    if left_out > 0 {
        let _ = write!(sd, " cut=\"{left_out}\"");
    }
    sd.push(']');
    head.push_str(&sd);
    head.push_str(&meta);
    let mut out = head.into_bytes();
    let msg = clean_msg(&e.msg, MAX_LEN.saturating_sub(out.len() + 4));
    if !msg.is_empty() {
        out.push(b' ');
        out.extend_from_slice("\u{FEFF}".as_bytes());
        out.extend_from_slice(msg.as_bytes());
    }
    out
}

/// RFC 6587 §3.4.1 octet counting: `LEN SP MSG`, for TCP and TLS (RFC 5425 §4.3).
pub fn octet_counted(msg: &[u8]) -> Vec<u8> {
    let mut out = format!("{} ", msg.len()).into_bytes();
    out.extend_from_slice(msg);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{Kind, Severity};
    use std::time::{Duration, UNIX_EPOCH};

    fn at() -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(1_800_000_000_123)
    }

    fn text(b: &[u8]) -> String {
        String::from_utf8(b.to_vec()).expect("UTF-8")
    }

    /// The SD-ELEMENTs of a message, parsed as a collector does (RFC 5424's grammar:
    /// inside a quoted value a backslash escapes the next character, a `"` ends it).
    type Element = (String, Vec<(String, String)>);

    fn parse_sd(msg: &str) -> (Vec<Element>, String) {
        // Skip the six header fields.
        let mut rest = msg;
        for _ in 0..6 {
            let at = rest.find(' ').expect("a header field");
            rest = &rest[at + 1..];
        }
        let mut elements = Vec::new();
        let mut chars = rest.char_indices().peekable();
        while let Some(&(_, '[')) = chars.peek() {
            chars.next();
            let mut id = String::new();
            let mut params = Vec::new();
            while let Some(&(_, c)) = chars.peek() {
                if c == ' ' || c == ']' {
                    break;
                }
                id.push(c);
                chars.next();
            }
            loop {
                match chars.next() {
                    Some((_, ']')) => break,
                    Some((_, ' ')) => {
                        let mut name = String::new();
                        for (_, c) in chars.by_ref() {
                            if c == '=' {
                                break;
                            }
                            assert!(c.is_ascii_graphic() && c != ']' && c != '"', "{c:?}");
                            name.push(c);
                        }
                        assert_eq!(chars.next().map(|x| x.1), Some('"'));
                        let mut value = String::new();
                        loop {
                            match chars.next().expect("a closed value").1 {
                                '\\' => value.push(chars.next().expect("escaped").1),
                                '"' => break,
                                ']' => panic!("an unescaped ] inside a value: {msg}"),
                                c => value.push(c),
                            }
                        }
                        params.push((name, value));
                    }
                    other => panic!("unexpected {other:?} in {msg}"),
                }
            }
            elements.push((id, params));
        }
        let tail: String = chars.map(|(_, c)| c).collect();
        (elements, tail)
    }

    #[test]
    fn a_message_has_every_header_field_of_rfc_5424() {
        let origin = Origin::new("beryl-ax", 4242);
        let e = Event::new(Kind::Isolate, Severity::Warning, "isolated by cli")
            .with("source", "cli")
            .with("who", "root");
        let m = text(&message(&origin, &e, at(), 7));
        assert_eq!(
            m,
            "<28>1 2027-01-15T08:00:00.123Z beryl-ax cage 4242 ISOLATE \
             [cage@32473 source=\"cli\" who=\"root\"][meta sequenceId=\"7\"] \
             \u{FEFF}isolated by cli"
        );
        let (sd, tail) = parse_sd(&m);
        assert_eq!(sd[0].0, SD_ID);
        assert_eq!(
            sd[1],
            ("meta".into(), vec![("sequenceId".into(), "7".into())])
        );
        assert_eq!(tail, " \u{FEFF}isolated by cli");
        // PRI: facility daemon (3) * 8 + severity.
        let e = Event::new(Kind::Applied, Severity::Info, "");
        let m = text(&message(&origin, &e, at(), 1));
        assert!(m.starts_with("<30>1 "), "{m}");
        assert!(
            m.ends_with("[cage@32473][meta sequenceId=\"1\"]"),
            "no MSG, no BOM: {m}"
        );
    }

    #[test]
    fn hostile_values_are_escaped_and_cannot_break_out() {
        let origin = Origin::new("router", 1);
        let hostile = [
            "evil\"] [cage@32473 isolated=\"0\"]",
            "a\\\"b",
            "name]with]brackets",
            "line one\nline two\r\n<13>1 - fake - - - - forged",
            "nul\0in the middle",
            "\\",
            "]\"\\",
            "tab\there\u{2028}sep",
            "ünïcödé ✓ 名前",
        ];
        for h in hostile {
            let e = Event::new(Kind::Blocked, Severity::Notice, h)
                .with("hostname", h)
                .with("name", h);
            let m = text(&message(&origin, &e, at(), 3));
            assert!(
                !m.contains('\n') && !m.contains('\r') && !m.contains('\0'),
                "{m:?}"
            );
            let (sd, tail) = parse_sd(&m);
            assert_eq!(sd.len(), 2, "exactly Cage's element and meta: {m}");
            let want: String = h
                .chars()
                .map(|c| if is_control(c) { '\u{FFFD}' } else { c })
                .collect();
            assert_eq!(
                sd[0].1,
                vec![
                    ("hostname".into(), want.clone()),
                    ("name".into(), want.clone())
                ],
                "{m}"
            );
            assert_eq!(tail, format!(" \u{FEFF}{want}"));
        }
        assert_eq!(escape_value("a\"b\\c]d"), "a\\\"b\\\\c\\]d");
    }

    #[test]
    fn names_and_the_hostname_are_made_valid() {
        assert_eq!(sd_name("prev_hash"), "prev_hash");
        assert_eq!(sd_name("a b=c]d\"e"), "a_b_c_d_e");
        assert_eq!(sd_name(""), "_");
        assert_eq!(sd_name(&"x".repeat(40)).len(), 32);
        assert_eq!(sd_name("ключ"), "____");
        assert_eq!(Origin::new("my router\n", 1).hostname, "myrouter");
        assert_eq!(Origin::new("", 1).hostname, "-");
        assert_eq!(Origin::new(&"h".repeat(300), 1).hostname.len(), 255);
    }

    #[test]
    fn long_values_and_many_params_stay_within_the_cap() {
        let origin = Origin::new(&"h".repeat(300), 2_000_000_000);
        // A value of escapes only doubles when escaped; it is cut first, on a character
        // boundary.
        let long = "]".repeat(5000);
        assert_eq!(escape_value(&long).len(), 2 * MAX_VALUE);
        let wide = "é".repeat(MAX_VALUE);
        assert!(escape_value(&wide).len() <= MAX_VALUE);
        let mut e = Event::new(Kind::Audit, Severity::Notice, "✓".repeat(3000));
        for i in 0..60 {
            e = e.with(&format!("field{i}"), &long);
        }
        let m = message(&origin, &e, at(), 2_147_483_647);
        assert!(m.len() <= MAX_LEN, "{} octets", m.len());
        let m = text(&m);
        let (sd, tail) = parse_sd(&m);
        let params = &sd[0].1;
        let cut: usize = params
            .iter()
            .find(|(n, _)| n == "cut")
            .map(|(_, v)| v.parse().unwrap())
            .expect("the params left out are counted");
        assert_eq!(params.len() - 1 + cut, 60);
        assert!(params.len() > 1, "some params fit: {m}");
        assert!(tail.starts_with(" \u{FEFF}✓"), "some MSG fits");
    }

    #[test]
    fn tcp_frames_are_octet_counted() {
        assert_eq!(octet_counted(b"<30>1 x"), b"7 <30>1 x".to_vec());
        let m = "é".as_bytes();
        assert_eq!(octet_counted(m), b"2 \xc3\xa9".to_vec());
    }
}
