//! Pictures, drawn on the server as inline SVG: bytes up and down over time, blocked
//! attempts over time, the top destinations. No chart library and no script: plain
//! `<rect>`, `<text>` and `<title>` elements (a bar's `<title>` is its tooltip and says
//! its figures), coloured by classes of the one stylesheet, so the page's
//! Content-Security-Policy (no inline style or script) holds. Each picture carries its
//! totals as `data-` attributes, for scripts and tests.
//!
//! The history is the flow log's own: a flow's bytes are spread over the minutes it
//! lasted. Nothing is kept in memory between requests, and a restart of the daemon loses
//! nothing the log kept.

use std::fmt::Write as _;

use crate::backend::FlowRecord;
use crate::html::{self, esc};

/// Width and height of a chart's drawing, in SVG units: about a phone's width, so its
/// text reads at its nominal size there.
const W: u32 = 360;
const H: u32 = 140;
/// Room at the bottom for the time labels, at the top for the scale.
const TOP: u32 = 16;
const BOTTOM: u32 = 16;
/// Where right-aligned text ends, clear of the frame.
const R: u32 = W - 3;

/// Milliseconds since the Unix epoch of an RFC 3339 UTC time as the flow log writes it
/// (`2026-12-07T12:00:00.123Z`, the fraction optional).
pub fn unix_ms(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || !s.ends_with('Z') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> { s.get(r)?.parse().ok() };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let ms = match s.get(19..s.len() - 1)? {
        "" => 0,
        f if f.starts_with('.') && f.len() > 1 => {
            let digits = &f[1..f.len().min(4)];
            let v: i64 = digits.parse().ok()?;
            v * 10i64.pow(3 - digits.len() as u32)
        }
        _ => return None,
    };
    // Howard Hinnant's days-from-civil.
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let t = ((days * 86_400 + h * 3600 + mi * 60 + sec) * 1000).checked_add(ms)?;
    u64::try_from(t).ok()
}

/// Bytes up and down in equal steps of time, oldest first, ending at `end`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Series {
    /// Start of the first step and the step, in Unix milliseconds.
    pub start: u64,
    pub step: u64,
    pub up: Vec<u64>,
    pub down: Vec<u64>,
}

impl Series {
    pub fn new(end: u64, span: u64, steps: usize) -> Series {
        let steps = steps.max(1);
        let step = (span / steps as u64).max(1);
        Series {
            start: end.saturating_sub(step * steps as u64),
            step,
            up: vec![0; steps],
            down: vec![0; steps],
        }
    }

    pub fn end(&self) -> u64 {
        self.start + self.step * self.up.len() as u64
    }

    /// Add a flow: its bytes spread evenly over the time it lasted, the part inside the
    /// series' window counted.
    pub fn add(&mut self, r: &FlowRecord) {
        if let (Some(s), Some(e)) = (unix_ms(&r.start), unix_ms(&r.end)) {
            self.add_span(s, e, r.bytes_out, r.bytes_in);
        }
    }

    /// Add `bytes_out` up and `bytes_in` down sent from `s` to `e` (Unix milliseconds).
    pub fn add_span(&mut self, s: u64, e: u64, bytes_out: u64, bytes_in: u64) {
        let e = e.max(s + 1);
        if e <= self.start || s >= self.end() {
            return;
        }
        let len = u128::from(e - s);
        let first = (s.max(self.start) - self.start) / self.step;
        let last = ((e.min(self.end()) - 1 - self.start) / self.step).min(self.up.len() as u64 - 1);
        let (mut up, mut down) = (0u64, 0u64);
        for i in first..=last {
            let b0 = self.start + i * self.step;
            let overlap = u128::from(e.min(b0 + self.step) - s.max(b0));
            let share = |bytes: u64| (u128::from(bytes) * overlap / len) as u64;
            let i = i as usize;
            self.up[i] = self.up[i].saturating_add(share(bytes_out));
            self.down[i] = self.down[i].saturating_add(share(bytes_in));
            up += share(bytes_out);
            down += share(bytes_in);
        }
        // A flow wholly inside the window counts exactly: what rounding down left over
        // goes to its last step.
        if s >= self.start && e <= self.end() {
            let i = last as usize;
            self.up[i] = self.up[i].saturating_add(bytes_out - up);
            self.down[i] = self.down[i].saturating_add(bytes_in - down);
        }
    }

    pub fn total_up(&self) -> u64 {
        self.up.iter().sum()
    }

    pub fn total_down(&self) -> u64 {
        self.down.iter().sum()
    }
}

/// The allowed and blocked bytes of `flows` over `span` ms before `end`, in `steps`.
pub fn traffic<'a>(
    flows: impl Iterator<Item = &'a FlowRecord>,
    end: u64,
    span: u64,
    steps: usize,
) -> Series {
    let mut s = Series::new(end, span, steps);
    for r in flows {
        s.add(r);
    }
    s
}

/// Blocked attempts (packets) of `flows` over `span` ms before `end`, by the time their
/// record ended.
pub fn blocked<'a>(
    flows: impl Iterator<Item = &'a FlowRecord>,
    end: u64,
    span: u64,
    steps: usize,
) -> Series {
    let mut s = Series::new(end, span, steps);
    for r in flows.filter(|r| r.verdict == "blocked") {
        let Some(t) = unix_ms(&r.end) else { continue };
        if t < s.start || t >= s.end() {
            continue;
        }
        let i = ((t - s.start) / s.step) as usize;
        s.up[i] = s.up[i].saturating_add((r.packets_out + r.packets_in).max(1));
    }
    s
}

/// "12:05" (UTC) of Unix milliseconds.
fn hhmm(ms: u64) -> String {
    html::time(ms / 1000).get(11..16).unwrap_or("").to_owned()
}

/// The `<svg>` element's opening: scalable to its box, a title for screen readers.
fn open(o: &mut String, id: &str, class: &str, w: u32, h: u32, title: &str, data: &str) {
    let _ = write!(
        o,
        "<svg id=\"{}\" class=\"chart {class}\" viewBox=\"0 0 {w} {h}\" role=img \
         aria-labelledby=\"{0}-t\"{data}><title id=\"{0}-t\">{}</title>",
        esc(id),
        esc(title)
    );
}

/// Bytes up (above the line, dark) and down (below it, light) over time, each bar's
/// figures in its tooltip. `compact`: a sparkline without text, for a table row.
pub fn traffic_svg(id: &str, title: &str, s: &Series, compact: bool) -> String {
    let (w, h, top, bottom) = if compact {
        (120, 28, 1, 1)
    } else {
        (W, H, TOP, BOTTOM)
    };
    let mut o = String::with_capacity(256 + s.up.len() * 120);
    let (up, down) = (s.total_up(), s.total_down());
    let full = format!(
        "{title}: {} up, {} down",
        html::bytes(up),
        html::bytes(down)
    );
    open(
        &mut o,
        id,
        "traffic",
        w,
        h,
        &full,
        &format!(" data-up=\"{up}\" data-down=\"{down}\""),
    );
    let max =
        s.up.iter()
            .chain(&s.down)
            .copied()
            .max()
            .unwrap_or(0)
            .max(1);
    let mid = top + (h - top - bottom) / 2;
    let half = f64::from(mid - top);
    let bar = f64::from(w) / s.up.len() as f64;
    // A sparkline is two paths (small in the page); a chart's bars are elements of
    // their own, each with its tooltip.
    let (mut pu, mut pd) = (String::new(), String::new());
    for (i, (&u, &d)) in s.up.iter().zip(&s.down).enumerate() {
        if u == 0 && d == 0 {
            continue;
        }
        let x = bar * i as f64;
        let hu = (u as f64 / max as f64 * half).max(if u > 0 { 1.0 } else { 0.0 });
        let hd = (d as f64 / max as f64 * half).max(if d > 0 { 1.0 } else { 0.0 });
        let bw = (bar - 0.4).max(0.6);
        if compact {
            if u > 0 {
                let _ = write!(pu, "M{x:.1} {mid}v-{hu:.1}h{bw:.1}v{hu:.1}z");
            }
            if d > 0 {
                let _ = write!(pd, "M{x:.1} {mid}v{hd:.1}h{bw:.1}v-{hd:.1}z");
            }
            continue;
        }
        let at = s.start + s.step * i as u64;
        let _ = write!(
            o,
            "<g><title>{}–{}: {} up, {} down</title>",
            hhmm(at),
            hhmm(at + s.step),
            html::bytes(u),
            html::bytes(d)
        );
        if u > 0 {
            let _ = write!(
                o,
                "<rect class=up x=\"{x:.1}\" y=\"{:.1}\" width=\"{bw:.1}\" height=\"{hu:.1}\"/>",
                f64::from(mid) - hu
            );
        }
        if d > 0 {
            let _ = write!(
                o,
                "<rect class=down x=\"{x:.1}\" y=\"{mid}\" width=\"{bw:.1}\" height=\"{hd:.1}\"/>"
            );
        }
        o.push_str("</g>");
    }
    if !pu.is_empty() {
        let _ = write!(o, "<path class=up d=\"{pu}\"/>");
    }
    if !pd.is_empty() {
        let _ = write!(o, "<path class=down d=\"{pd}\"/>");
    }
    let _ = write!(
        o,
        "<line class=axis x1=\"0\" y1=\"{mid}\" x2=\"{w}\" y2=\"{mid}\"/>"
    );
    if !compact {
        let _ = write!(
            o,
            "<text x=\"2\" y=\"11\">↑ {} up · ↓ {} down</text>\
             <text x=\"{}\" y=\"11\" text-anchor=end>max {}</text>",
            esc(&html::bytes(up)),
            esc(&html::bytes(down)),
            w - 3,
            esc(&html::bytes(max))
        );
        time_axis(&mut o, s, w, h);
    }
    o.push_str("</svg>");
    o
}

fn time_axis(o: &mut String, s: &Series, w: u32, h: u32) {
    let _ = write!(
        o,
        "<text x=\"2\" y=\"{y}\">{}</text><text x=\"{}\" y=\"{y}\" text-anchor=middle>{}</text>\
         <text x=\"{r}\" y=\"{y}\" text-anchor=end>{} UTC</text>",
        hhmm(s.start),
        w / 2,
        hhmm(s.start + (s.end() - s.start) / 2),
        hhmm(s.end()),
        r = w - 3,
        y = h - 3
    );
}

/// Blocked attempts over time (the series' `up`), each bar's count in its tooltip.
pub fn blocked_svg(id: &str, title: &str, s: &Series) -> String {
    let total = s.total_up();
    let mut o = String::with_capacity(256 + s.up.len() * 100);
    open(
        &mut o,
        id,
        "blocked",
        W,
        H,
        &format!("{title}: {total} blocked attempts"),
        &format!(" data-total=\"{total}\""),
    );
    let max = s.up.iter().copied().max().unwrap_or(0).max(1);
    let base = H - BOTTOM;
    let room = f64::from(base - TOP);
    let bar = f64::from(W) / s.up.len() as f64;
    for (i, &n) in s.up.iter().enumerate() {
        if n == 0 {
            continue;
        }
        let at = s.start + s.step * i as u64;
        let hn = (n as f64 / max as f64 * room).max(1.0);
        let _ = write!(
            o,
            "<g><title>{}–{}: {n} blocked</title><rect class=blk x=\"{:.1}\" y=\"{:.1}\" \
             width=\"{:.1}\" height=\"{hn:.1}\"/></g>",
            hhmm(at),
            hhmm(at + s.step),
            bar * i as f64,
            f64::from(base) - hn,
            (bar - 0.4).max(0.6)
        );
    }
    let _ = write!(
        o,
        "<line class=axis x1=\"0\" y1=\"{base}\" x2=\"{W}\" y2=\"{base}\"/>\
         <text x=\"2\" y=\"11\">{total} blocked</text>\
         <text x=\"{R}\" y=\"11\" text-anchor=end>max {max}</text>"
    );
    time_axis(&mut o, s, W, H);
    o.push_str("</svg>");
    o
}

/// Names with bytes up and down as horizontal bars, largest first as given; each row's
/// name and figures in its tooltip and `data-` attributes.
pub fn top_svg(id: &str, title: &str, rows: &[(String, u64, u64)]) -> String {
    const ROW: u32 = 28;
    let h = (ROW * rows.len() as u32).max(ROW) + 4;
    let mut o = String::with_capacity(256 + rows.len() * 300);
    open(&mut o, id, "top", W, h, title, "");
    let max = rows.iter().map(|r| r.1 + r.2).max().unwrap_or(0).max(1);
    if rows.is_empty() {
        o.push_str("<text x=\"2\" y=\"18\">No allowed flows yet.</text>");
    }
    for (i, (name, up, down)) in rows.iter().enumerate() {
        let y = ROW * i as u32;
        let shown: String = if name.chars().count() > 40 {
            name.chars().take(39).chain(['…']).collect()
        } else {
            name.clone()
        };
        let wu = *up as f64 / max as f64 * f64::from(W);
        let wd = *down as f64 / max as f64 * f64::from(W);
        let _ = write!(
            o,
            "<g data-name=\"{n}\" data-up=\"{up}\" data-down=\"{down}\"><title>{n}: {bu} up, {bd} down</title>\
             <text x=\"2\" y=\"{ty}\">{shown}</text><text x=\"{R}\" y=\"{ty}\" text-anchor=end>{total}</text>\
             <rect class=up x=\"0\" y=\"{ry}\" width=\"{wu:.1}\" height=\"9\"/>\
             <rect class=down x=\"{wu:.1}\" y=\"{ry}\" width=\"{wd:.1}\" height=\"9\"/></g>",
            n = esc(name),
            bu = esc(&html::bytes(*up)),
            bd = esc(&html::bytes(*down)),
            ty = y + 11,
            shown = esc(&shown),
            total = esc(&html::bytes(up + down)),
            ry = y + 15,
        );
    }
    o.push_str("</svg>");
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(start: &str, end: &str, up: u64, down: u64) -> FlowRecord {
        FlowRecord {
            start: start.into(),
            end: end.into(),
            verdict: "allowed".into(),
            rule: None,
            proto: "tcp".into(),
            host: "192.168.10.11".parse().unwrap(),
            host_port: None,
            mac: None,
            bridge_port: None,
            peer: "203.0.113.10".parse().unwrap(),
            peer_port: None,
            direction: "out".into(),
            packets_out: 1,
            bytes_out: up,
            packets_in: 1,
            bytes_in: down,
            tag: None,
            tcp_flags: None,
            hostname: None,
            name: None,
        }
    }

    #[test]
    fn times_read_as_the_flow_log_writes_them() {
        assert_eq!(unix_ms("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(unix_ms("2025-11-25T10:31:00.123Z"), Some(1_764_066_660_123));
        assert_eq!(unix_ms("2025-11-25T10:31:00.5Z"), Some(1_764_066_660_500));
        assert_eq!(unix_ms("2000-02-29T23:59:59Z"), Some(951_868_799_000));
        for bad in [
            "",
            "2025-11-25 10:31:00Z",
            "2025-13-25T10:31:00Z",
            "2025-11-25T10:31:00",
            "2025-11-25T10:31:00.Z",
            "2025-11-25T10:31:00.12xZ",
            "2025-11-25T1a:31:00Z",
        ] {
            assert_eq!(unix_ms(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_flow_spreads_over_the_minutes_it_lasted() {
        let end = unix_ms("2026-12-07T13:00:00Z").unwrap();
        // Two minutes, 12:58:30 to 13:00:30: 30 s before the hour's last minute, all of
        // it, and 30 s after the window.
        let f = rec("2026-12-07T12:58:30Z", "2026-12-07T13:00:30Z", 1200, 2400);
        let s = traffic([f].iter(), end, 3_600_000, 60);
        assert_eq!(s.up.len(), 60);
        assert_eq!(&s.up[57..], &[0, 300, 600]);
        assert_eq!(&s.down[57..], &[0, 600, 1200]);
        assert_eq!(
            s.total_up(),
            900,
            "the part after the window is not counted"
        );
        // Rounding loses nothing of a flow inside the window: 1000 bytes over three
        // minutes, 20 s in the first.
        let f = rec("2026-12-07T12:10:40Z", "2026-12-07T12:13:40Z", 1000, 1);
        let s = traffic([f].iter(), end, 3_600_000, 60);
        assert_eq!(&s.up[10..14], &[111, 333, 333, 223]);
        assert_eq!((s.total_up(), s.total_down()), (1000, 1));
        // Outside the window entirely, or unreadable: nothing.
        let old = rec("2026-12-07T11:00:00Z", "2026-12-07T11:30:00Z", 5, 5);
        let bad = rec("yesterday", "today", 5, 5);
        let s = traffic([old, bad].iter(), end, 3_600_000, 60);
        assert_eq!(s.total_up() + s.total_down(), 0);
    }

    #[test]
    fn charts_carry_their_figures_and_escape_names() {
        let end = unix_ms("2026-12-07T13:00:00Z").unwrap();
        let f = rec("2026-12-07T12:10:00Z", "2026-12-07T12:10:20Z", 2048, 512);
        let s = traffic([f].iter(), end, 3_600_000, 60);
        let svg = traffic_svg("t", "Last hour", &s, false);
        assert!(
            svg.starts_with("<svg id=\"t\" class=\"chart traffic\""),
            "{svg}"
        );
        assert!(svg.contains("data-up=\"2048\" data-down=\"512\""), "{svg}");
        assert!(
            svg.contains("<title>12:10–12:11: 2.0 KB up, 512 B down</title>"),
            "{svg}"
        );
        assert_eq!(svg.matches("<rect class=up").count(), 1);
        assert_eq!(svg.matches("<rect class=down").count(), 1);
        assert!(
            svg.contains(">12:00</text>") && svg.contains(">13:00 UTC</text>"),
            "{svg}"
        );
        assert!(!svg.contains("style="), "inline style breaks the CSP");
        let spark = traffic_svg("s", "ai1", &s, true);
        assert!(!spark.contains("<text"), "{spark}");
        assert!(
            spark.contains("<path class=up d=\"M20.0 14v-13.0h1.6v13.0z\"/>"),
            "{spark}"
        );
        assert!(spark.contains("data-up=\"2048\""), "{spark}");

        let mut b = f_blocked("2026-12-07T12:30:10Z", 7);
        let s = blocked([b.clone()].iter(), end, 3_600_000, 12);
        assert_eq!(s.up[6], 7);
        let svg = blocked_svg("b", "Blocked", &s);
        assert!(svg.contains("data-total=\"7\""), "{svg}");
        assert!(
            svg.contains("<title>12:30–12:35: 7 blocked</title>"),
            "{svg}"
        );
        b.verdict = "allowed".into();
        assert_eq!(blocked([b].iter(), end, 3_600_000, 12).total_up(), 0);

        let svg = top_svg(
            "d",
            "Top",
            &[
                ("<script>x".into(), 3000, 1000),
                ("b.example".into(), 10, 0),
            ],
        );
        assert!(!svg.contains("<script>"), "{svg}");
        assert!(svg.contains("data-name=\"&lt;script&gt;x\" data-up=\"3000\""));
        assert_eq!(svg.matches("<g ").count(), 2);
        // Row one: its name over its bars, up then down, scaled to the largest row.
        assert!(
            svg.contains(
                "<text x=\"2\" y=\"11\">&lt;script&gt;x</text><text x=\"357\" y=\"11\" \
                 text-anchor=end>3.9 KB</text><rect class=up x=\"0\" y=\"15\" width=\"270.0\" \
                 height=\"9\"/><rect class=down x=\"270.0\" y=\"15\" width=\"90.0\" height=\"9\"/>"
            ),
            "{svg}"
        );
        assert!(
            svg.contains("<text x=\"2\" y=\"39\">b.example</text>"),
            "{svg}"
        );
        assert!(top_svg("e", "Top", &[]).contains("No allowed flows yet."));
    }

    fn f_blocked(end: &str, packets: u64) -> FlowRecord {
        let mut r = rec(end, end, 0, 0);
        r.verdict = "blocked".into();
        r.packets_out = packets;
        r.packets_in = 0;
        r
    }
}
