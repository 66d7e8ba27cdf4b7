//! Server-side HTML: escaping, the page frame, small formatters. Every value that comes
//! from outside (the flow log, the audit log, a form) goes through [`esc`].

use std::fmt::Write as _;

use axum::response::Html;

/// Escape text for HTML element content and quoted attribute values.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

const HEAD: &str = "<!doctype html><html lang=en><head><meta charset=utf-8>\
<meta name=viewport content=\"width=device-width,initial-scale=1\">\
<link rel=stylesheet href=\"/assets/cage.css\">\
<script src=\"/assets/cage.js\" defer></script>";

/// The pages of the navigation bar: (id, path, label).
const NAV: [(&str, &str, &str); 7] = [
    ("dashboard", "/", "Dashboard"),
    ("hosts", "/hosts", "Hosts"),
    ("flows", "/flows", "Flows"),
    ("alerts", "/alerts", "Alerts"),
    ("dns", "/dns", "DNS"),
    ("port", "/port", "AI port"),
    ("settings", "/settings", "Settings"),
];

/// A page of a logged-in user: navigation, logout, and the session's CSRF token for the
/// script (`<meta name=csrf>`) and the forms.
pub fn page(title: &str, active: &str, csrf: &str, body: &str) -> Html<String> {
    let mut o = String::with_capacity(body.len() + 1024);
    o.push_str(HEAD);
    let _ = write!(
        o,
        "<meta name=csrf content=\"{}\"><title>Cage — {}</title></head><body><header><nav>",
        esc(csrf),
        esc(title)
    );
    o.push_str("<span class=brand>Cage</span>");
    for (id, path, label) in NAV {
        let _ = write!(
            o,
            "<a id=nav-{id} href=\"{path}\"{}>{label}</a>",
            if id == active { " class=active" } else { "" }
        );
    }
    let _ = write!(
        o,
        "<form method=post action=\"/logout\" class=logout><input type=hidden name=csrf value=\"{}\"><button id=logout>Log out</button></form>",
        esc(csrf)
    );
    o.push_str("</nav></header><main>");
    o.push_str(body);
    o.push_str("</main></body></html>");
    Html(o)
}

/// A page without navigation (login, setup, errors).
pub fn bare_page(title: &str, body: &str) -> Html<String> {
    Html(format!(
        "{HEAD}<title>Cage — {}</title></head><body><header><nav><span class=brand>Cage</span></nav></header><main class=narrow>{body}</main></body></html>",
        esc(title)
    ))
}

/// A hidden CSRF field for a form.
pub fn csrf_field(csrf: &str) -> String {
    format!("<input type=hidden name=csrf value=\"{}\">", esc(csrf))
}

/// 1536 → "1.5 KB".
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Unix time as "2026-11-25 10:31:00 UTC"; 0 as "never".
pub fn time(unix: u64) -> String {
    if unix == 0 {
        return "never".into();
    }
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// An RFC 3339 time from the flow log, shortened for a table ("2026-11-25 10:31:00").
pub fn rfc3339_short(s: &str) -> String {
    s.get(..19).unwrap_or(s).replace('T', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_formats() {
        assert_eq!(
            esc("<a href='x'>&\"</a>"),
            "&lt;a href=&#39;x&#39;&gt;&amp;&quot;&lt;/a&gt;"
        );
        assert_eq!(time(0), "never");
        assert_eq!(time(1_764_066_660), "2025-11-25 10:31:00 UTC");
        assert_eq!(bytes(1536), "1.5 KB");
        assert_eq!(bytes(12), "12 B");
        assert_eq!(
            rfc3339_short("2026-11-25T10:31:00.123Z"),
            "2026-11-25 10:31:00"
        );
    }
}
