//! What every request passes before a handler: the Host check (a page reached under a
//! name it does not know is a DNS rebinding attempt), the Origin/Referer check on
//! changes, and the security headers on every response.

use std::net::IpAddr;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::backend::Access;
use crate::{AppState, WebError};

pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
img-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; \
base-uri 'none'";

/// `same-origin`, not `no-referrer`: under `no-referrer` a browser sends `Origin: null`
/// with this page's own POSTs, and on plain HTTP no Sec-Fetch-Site either, so the Origin
/// check could not tell the page's own forms from a foreign page that also chose
/// `no-referrer`. `same-origin` sends the Referer to this page only, never to another
/// site, and gives this page's own POSTs their real Origin.
pub const REFERRER_POLICY: &str = "same-origin";

/// Whether the Host header names this page: one of its listen addresses (with or
/// without its port) or one of `cage.main.web_hostname` (with or without the port).
pub fn host_allowed(host: &str, access: &Access) -> bool {
    let (name, port) = split_host(host);
    if port.is_some_and(|p| p != access.port) {
        return false;
    }
    if let Ok(ip) = name
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
    {
        // An IPv6 literal must come bracketed, an IPv4 one must not.
        let bracketed = name.starts_with('[') && name.ends_with(']');
        return access.addresses.contains(&ip) && bracketed == ip.is_ipv6();
    }
    let name = name.strip_suffix('.').unwrap_or(name);
    access
        .hostnames
        .iter()
        .any(|h| h.eq_ignore_ascii_case(name))
}

/// "name:port" → ("name", Some(port)); "[::1]:80" → ("[::1]", Some(80)); a port that is
/// not a number gives `Some(0)`, which never matches.
fn split_host(host: &str) -> (&str, Option<u16>) {
    let (name, port) = if let Some(end) = host.rfind(']') {
        match host[end + 1..].strip_prefix(':') {
            Some(p) => (&host[..end + 1], Some(p)),
            None if end + 1 == host.len() => (host, None),
            None => (host, Some("")),
        }
    } else {
        match host.rsplit_once(':') {
            Some((n, p)) => (n, Some(p)),
            None => (host, None),
        }
    };
    (name, port.map(|p| p.parse().unwrap_or(0)))
}

/// A change must come from this page: its Origin (or, without one, its Referer) must be
/// this host. A request with neither (a script with curl) passes; it still needs the
/// session's CSRF token.
fn origin_allowed(headers: &HeaderMap, host: &str) -> Result<(), String> {
    // The part after the scheme, if the scheme is http or https.
    let rest = |v: &str| -> Option<String> {
        let lower = v.to_ascii_lowercase();
        ["http://", "https://"]
            .iter()
            .find_map(|scheme| lower.strip_prefix(scheme).map(str::to_owned))
    };
    let host = host.to_ascii_lowercase();
    // Browsers say where a request comes from in Sec-Fetch-Site; "none" is the user's own
    // doing (the address bar).
    let site = headers
        .get("sec-fetch-site")
        .map(|v| v.to_str().unwrap_or("").to_ascii_lowercase());
    if let Some(site) = site
        .as_deref()
        .filter(|s| !matches!(*s, "same-origin" | "none"))
    {
        return Err(format!(
            "this change comes from another site (Sec-Fetch-Site '{}'); open the page at http://{host}/",
            site.chars().take(30).collect::<String>()
        ));
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("");
        // A page under `Referrer-Policy: no-referrer` sends `Origin: null` with every form
        // or fetch POST, even to its own origin (Fetch standard, "append a request
        // `Origin` header"). A foreign page can choose that policy to hide where it is;
        // so `null` passes only when Sec-Fetch-Site vouches for it, which browsers send
        // to secure contexts only (not to this plain-HTTP page).
        if origin == "null" {
            return if site.as_deref() == Some("same-origin") {
                Ok(())
            } else {
                Err(format!(
                    "this change has Origin 'null' and does not say it comes from this page; \
                     open the page at http://{host}/"
                ))
            };
        }
        // An Origin is exactly scheme://host[:port].
        return if rest(origin).is_some_and(|r| r == host) {
            Ok(())
        } else {
            Err(format!(
                "this change comes from another site (Origin '{}'); open the page at http://{host}/",
                origin.chars().take(100).collect::<String>()
            ))
        };
    }
    if let Some(referer) = headers.get(header::REFERER) {
        let referer = referer.to_str().unwrap_or("");
        let same = rest(referer).is_some_and(|r| {
            r.strip_prefix(host.as_str())
                .is_some_and(|after| after.is_empty() || after.starts_with(['/', '?', '#']))
        });
        if !same {
            return Err(format!(
                "this change comes from another page (Referer '{}'); open the page at http://{host}/",
                referer.chars().take(100).collect::<String>()
            ));
        }
    }
    Ok(())
}

/// The middleware of every route.
pub async fn guard(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let api = path.starts_with("/api/");
    let asset = path.starts_with("/assets/");
    let access = state.backend.access();
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        // HTTP/1.0 without Host, or HTTP/2 with :authority only.
        .or_else(|| req.uri().authority().map(|a| a.as_str().to_owned()));
    let refused = match &host {
        None => Some(WebError::bad("the request has no Host header")),
        Some(h) if !host_allowed(h, &access) => Some(WebError::new(
            StatusCode::MISDIRECTED_REQUEST,
            format!(
                "this page is not served under the name '{}'; open http://{}/ (or add the \
                 name to cage.main.web_hostname)",
                h.chars().take(100).collect::<String>(),
                access.url_host()
            ),
        )),
        Some(h) if !matches!(*req.method(), Method::GET | Method::HEAD) => {
            origin_allowed(req.headers(), h)
                .err()
                .map(WebError::forbidden)
        }
        Some(_) => None,
    };
    let mut response = match refused {
        Some(e) => e.api(api).into_response(),
        None => next.run(req).await,
    };
    let cacheable = asset && response.status().is_success();
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static(REFERRER_POLICY),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    if !cacheable {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

pub async fn not_found(req: Request) -> WebError {
    WebError::new(
        StatusCode::NOT_FOUND,
        format!(
            "there is no page {}",
            req.uri().path().chars().take(100).collect::<String>()
        ),
    )
    .api(req.uri().path().starts_with("/api/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access() -> Access {
        Access {
            addresses: vec!["192.168.8.1".parse().unwrap(), "fd00:8::1".parse().unwrap()],
            port: 8080,
            hostnames: vec!["cage.lan".into()],
        }
    }

    #[test]
    fn hosts() {
        let a = access();
        for ok in [
            "192.168.8.1:8080",
            "192.168.8.1",
            "cage.lan",
            "CAGE.lan:8080",
            "cage.lan.",
            "[fd00:8::1]:8080",
        ] {
            assert!(host_allowed(ok, &a), "{ok}");
        }
        for bad in [
            "evil.example",
            "192.168.8.1:80",
            "192.168.8.2:8080",
            "cage.lan:81",
            "cage.lan.evil.example",
            "[192.168.8.1]:8080",
            "192.168.8.1:x",
            "",
            ":8080",
            "[fd00:8::1]:80",
            "[fd00:8::2]:8080",
        ] {
            assert!(!host_allowed(bad, &a), "{bad}");
        }
        let v6 = Access {
            addresses: vec!["fd00::1".parse().unwrap()],
            port: 8080,
            hostnames: vec![],
        };
        assert!(host_allowed("[fd00::1]:8080", &v6));
        assert!(host_allowed("[fd00::1]", &v6));
        assert!(!host_allowed("fd00::1", &v6));
        assert!(!host_allowed("[fd00::1]x", &v6));
    }

    #[test]
    fn origins() {
        let mut h = HeaderMap::new();
        assert!(origin_allowed(&h, "cage.lan").is_ok());
        h.insert(header::ORIGIN, "http://cage.lan".parse().unwrap());
        assert!(origin_allowed(&h, "cage.lan").is_ok());
        for bad in [
            "http://evil.example",
            "null",
            "http://cage.lan.evil",
            "http://cage.lan/x",
            "ftp://cage.lan",
        ] {
            h.insert(header::ORIGIN, bad.parse().unwrap());
            assert!(origin_allowed(&h, "cage.lan").is_err(), "{bad}");
        }
        h.insert(header::ORIGIN, "null".parse().unwrap());
        assert!(origin_allowed(&h, "cage.lan").is_err(), "null alone");
        h.insert("sec-fetch-site", "same-origin".parse().unwrap());
        assert!(
            origin_allowed(&h, "cage.lan").is_ok(),
            "null from the same origin"
        );
        h.insert("sec-fetch-site", "cross-site".parse().unwrap());
        assert!(origin_allowed(&h, "cage.lan").is_err(), "cross-site");
        h.remove("sec-fetch-site");
        h.remove(header::ORIGIN);
        h.insert(header::REFERER, "http://cage.lan/settings".parse().unwrap());
        assert!(origin_allowed(&h, "cage.lan").is_ok());
        h.insert(
            header::REFERER,
            "http://evil.example/cage.lan".parse().unwrap(),
        );
        assert!(origin_allowed(&h, "cage.lan").is_err());
    }
}
