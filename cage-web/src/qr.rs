//! The AI Wi-Fi as a QR code: the payload phones read to join a network
//! (`WIFI:T:WPA;S:<name>;P:<key>;;`, the format ZXing defined and the Wi-Fi Alliance's
//! WPA3 specification adopted), and the code drawn as SVG on the server (the `qrcodegen`
//! crate encodes, without dependencies; this module draws).

use std::fmt::Write as _;

use qrcodegen::{QrCode, QrCodeEcc};

use crate::backend::AiWifi;

/// The format's escaping: `\`, `;`, `,`, `:` and `"` get a backslash before them.
pub fn escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '\\' | ';' | ',' | ':' | '"') {
            o.push('\\');
        }
        o.push(c);
    }
    o
}

/// The `T:` of an access point's OpenWrt `encryption` (`psk2`, `psk2+ccmp`, `sae-mixed`,
/// `none`, `owe`, `wep-open`, …): `WPA` for every pre-shared-key mode, WPA3's SAE
/// included (phones take `WPA` for WPA, WPA2 and WPA3 personal), `WEP`, or `nopass`.
/// `None` for what a QR code cannot carry: enterprise (802.1X) networks.
pub fn auth_type(encryption: &str) -> Option<&'static str> {
    let base = encryption.split('+').next().unwrap_or("");
    match base {
        "" | "none" | "owe" => Some("nopass"),
        "psk" | "psk2" | "psk-mixed" | "sae" | "sae-mixed" => Some("WPA"),
        b if b.starts_with("wep") => Some("WEP"),
        _ => None,
    }
}

/// The payload of `w`'s QR code, or why there is none.
pub fn payload(w: &AiWifi) -> Result<String, String> {
    let Some(t) = auth_type(&w.encryption) else {
        return Err(format!(
            "its encryption '{}' needs a user name and certificate (802.1X), which a QR \
             code cannot carry",
            w.encryption
        ));
    };
    let mut o = format!("WIFI:T:{t};S:{};", escape(&w.ssid));
    if t != "nopass" {
        if w.key.is_empty() {
            return Err("it has no key in the wireless configuration".into());
        }
        let _ = write!(o, "P:{};", escape(&w.key));
    }
    if w.hidden {
        o.push_str("H:true;");
    }
    o.push(';');
    Ok(o)
}

/// Modules of light border the format asks for around the code.
const QUIET: i32 = 4;

/// `data` as a QR code (error correction M at least: the encoder raises it where the
/// same size allows), drawn as one SVG path of unit squares in a
/// `viewBox`, so it scales to any size without blurring; `id` and `label` name it for
/// the page and for screen readers.
pub fn svg(data: &str, id: &str, label: &str) -> Result<String, String> {
    let code = QrCode::encode_text(data, QrCodeEcc::Medium)
        .map_err(|e| format!("cannot encode it as a QR code: {e}"))?;
    let width = code.size();
    let size = width + 2 * QUIET;
    let mut path = String::with_capacity((width * width * 4) as usize);
    for y in 0..width {
        for x in 0..width {
            if code.get_module(x, y) {
                let _ = write!(path, "M{} {}h1v1h-1z", x + QUIET, y + QUIET);
            }
        }
    }
    Ok(format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" id=\"{}\" class=qr viewBox=\"0 0 {size} {size}\" \
         role=img aria-label=\"{}\" shape-rendering=crispEdges><rect width=\"{size}\" \
         height=\"{size}\" fill=\"#fff\"/><path fill=\"#000\" d=\"{path}\"/></svg>",
        crate::html::esc(id),
        crate::html::esc(label),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wifi(ssid: &str, key: &str, encryption: &str) -> AiWifi {
        AiWifi {
            ssid: ssid.into(),
            key: key.into(),
            encryption: encryption.into(),
            hidden: false,
            enabled: true,
        }
    }

    #[test]
    fn the_special_characters_are_escaped_and_nothing_else() {
        assert_eq!(escape(r#"a\b;c,d:e"f"#), r#"a\\b\;c\,d\:e\"f"#);
        assert_eq!(escape("Cage-AI 5 GHz é ü"), "Cage-AI 5 GHz é ü");
        assert_eq!(escape(""), "");
        // Escaping twice escapes the backslashes the first pass put in.
        assert_eq!(escape(&escape(";")), r"\\\;");
    }

    #[test]
    fn the_payload_is_the_standard_wifi_format() {
        assert_eq!(
            payload(&wifi("Cage-AI", "0123456789abcdef0123", "psk2")).unwrap(),
            "WIFI:T:WPA;S:Cage-AI;P:0123456789abcdef0123;;"
        );
        assert_eq!(
            payload(&wifi(r#"My;Cage,"AI":\"#, r#"p;a,s:s\w"o"rd"#, "sae-mixed")).unwrap(),
            r#"WIFI:T:WPA;S:My\;Cage\,\"AI\"\:\\;P:p\;a\,s\:s\\w\"o\"rd;;"#
        );
        let mut hidden = wifi("Cage-AI", "secretkey", "psk2+ccmp");
        hidden.hidden = true;
        assert_eq!(
            payload(&hidden).unwrap(),
            "WIFI:T:WPA;S:Cage-AI;P:secretkey;H:true;;"
        );
        assert_eq!(
            payload(&wifi("open", "ignored", "none")).unwrap(),
            "WIFI:T:nopass;S:open;;"
        );
        assert_eq!(
            payload(&wifi("old", "12345", "wep-open")).unwrap(),
            "WIFI:T:WEP;S:old;P:12345;;"
        );
    }

    #[test]
    fn what_a_qr_code_cannot_carry_says_why() {
        let e = payload(&wifi("corp", "", "wpa2+ccmp")).unwrap_err();
        assert!(e.contains("802.1X"), "{e}");
        let e = payload(&wifi("Cage-AI", "", "psk2")).unwrap_err();
        assert!(e.contains("no key"), "{e}");
    }

    #[test]
    fn the_svg_is_square_escaped_and_has_dark_modules() {
        let s = svg("WIFI:T:WPA;S:Cage-AI;P:x;;", "q\"1", "join <it>").unwrap();
        assert!(s.starts_with("<svg "), "{s}");
        assert!(s.contains("id=\"q&quot;1\""), "{s}");
        assert!(s.contains("aria-label=\"join &lt;it&gt;\""), "{s}");
        // Version 2 (25 modules) at level M for this payload, plus the quiet zone.
        assert!(s.contains("viewBox=\"0 0 33 33\""), "{s}");
        // The three finder patterns' corners are dark: the top left one at (4, 4).
        assert!(s.contains("M4 4h1v1h-1z"), "{s}");
        assert!(s.ends_with("</svg>"));
        // Too much for any QR code: an error, not a panic.
        assert!(svg(&"x".repeat(5000), "q", "l").is_err());
    }
}
