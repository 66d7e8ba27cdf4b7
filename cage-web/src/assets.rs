//! The page's only two assets, embedded in the binary (a router is often offline).

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};

pub const CSS: &str = include_str!("../assets/cage.css");
pub const JS: &str = include_str!("../assets/cage.js");

fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // They change only with the binary.
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("max-age=3600"),
    );
    r
}

pub async fn css() -> Response {
    asset(CSS, "text/css; charset=utf-8")
}

pub async fn js() -> Response {
    asset(JS, "text/javascript; charset=utf-8")
}
