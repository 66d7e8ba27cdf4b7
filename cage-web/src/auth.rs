//! Who may do what: the session extractor and the CSRF-checked bodies.
//!
//! [`Authed`] is a valid session (else 401 for the API, a redirect to `/login` for a page,
//! or to `/setup` while no password is set). [`PageForm`] and [`ApiJson`] are a POST
//! body that may only be read once the session's CSRF token came with it (the `csrf`
//! form field or the `X-CSRF-Token` header; else 403); then it is parsed (else 400 with
//! what was wrong). So the order of refusals is always: no session, no token, bad input.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use serde::de::DeserializeOwned;

use crate::session::{self, Active};
use crate::{AppState, WebError};

/// The CSRF header of the JSON API.
pub const CSRF_HEADER: &str = "x-csrf-token";

/// The value of cookie `name`, from every Cookie header.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// The client's address, for the login backoff and the audit log.
pub fn client_ip(parts: &Parts) -> IpAddr {
    parts
        .extensions
        .get::<ConnectInfo<crate::listener::Peer>>()
        .map(|c| c.0 .0.ip())
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
}

/// A logged-in request.
#[derive(Debug, Clone)]
pub struct Authed {
    pub session: Active,
    pub ip: IpAddr,
}

impl Authed {
    /// Who, for the audit log.
    pub fn who(&self) -> String {
        format!("web:{}", self.ip)
    }
}

impl FromRequestParts<AppState> for Authed {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Response> {
        let api = parts.uri.path().starts_with("/api/");
        let token = cookie(&parts.headers, session::COOKIE);
        let found = token.and_then(|t| state.sessions().touch(t, Instant::now()));
        if let Some(session) = found {
            return Ok(Authed {
                session,
                ip: client_ip(parts),
            });
        }
        let no_password = state.backend.password_hash().await.is_none();
        Err(if api {
            WebError::new(
                StatusCode::UNAUTHORIZED,
                if no_password {
                    "no password is set yet: open the page in a browser to set one, or run `cage passwd`"
                } else {
                    "log in first: POST /api/login with {\"password\": \"…\"}"
                },
            )
            .api(true)
            .into_response()
        } else if no_password {
            Redirect::to("/setup").into_response()
        } else {
            Redirect::to("/login").into_response()
        })
    }
}

fn body_error(e: impl std::fmt::Display, status: StatusCode, api: bool) -> Response {
    WebError::new(status, format!("cannot read the request: {e}"))
        .api(api)
        .into_response()
}

/// A form POSTed by a logged-in page, with the session's CSRF token.
pub struct PageForm<T>(pub Authed, pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for PageForm<T> {
    type Rejection = Response;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Response> {
        let (mut parts, body) = req.into_parts();
        let authed = Authed::from_request_parts(&mut parts, state).await?;
        let header_token = parts
            .headers
            .get(CSRF_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let req = Request::from_parts(parts, body);
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e| body_error(e.body_text(), e.status(), false))?;
        let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(&bytes).unwrap_or_default();
        let token = header_token.or_else(|| {
            pairs
                .iter()
                .find(|(k, _)| k == "csrf")
                .map(|(_, v)| v.clone())
        });
        if !token.is_some_and(|t| session::same(&t, &authed.session.csrf)) {
            return Err(csrf_refused(false));
        }
        let value = serde_urlencoded::from_bytes(&bytes).map_err(|e| {
            WebError::bad(format!("the form is not as expected: {e}")).into_response()
        })?;
        Ok(PageForm(authed, value))
    }
}

pub fn csrf_refused(api: bool) -> Response {
    WebError::forbidden(if api {
        "missing or wrong CSRF token: send the X-CSRF-Token header with the token that \
         POST /api/login returned"
    } else {
        "the form's security token is missing or out of date (a new login changes it); \
         reload the page and try again"
    })
    .api(api)
    .into_response()
}

/// A JSON body POSTed to the API with the session's CSRF token in `X-CSRF-Token`.
/// An empty body counts as `{}`.
pub struct ApiJson<T>(pub Authed, pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for ApiJson<T> {
    type Rejection = Response;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Response> {
        let (mut parts, body) = req.into_parts();
        let authed = Authed::from_request_parts(&mut parts, state).await?;
        let token = parts.headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok());
        if !token.is_some_and(|t| session::same(t, &authed.session.csrf)) {
            return Err(csrf_refused(true));
        }
        let value = json_body(Request::from_parts(parts, body), state).await?;
        Ok(ApiJson(authed, value))
    }
}

/// A JSON body: `Content-Type: application/json` (415 otherwise), parsed (400 with
/// serde's message otherwise). Also used by `POST /api/login`, which has no session yet:
/// a cross-site form cannot send this content type without a CORS preflight, which this
/// server never grants.
pub async fn json_body<T: DeserializeOwned>(req: Request, state: &AppState) -> Result<T, Response> {
    let json = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    let bytes = Bytes::from_request(req, state)
        .await
        .map_err(|e| body_error(e.body_text(), e.status(), true))?;
    let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else if !json {
        return Err(WebError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send JSON with Content-Type: application/json",
        )
        .api(true)
        .into_response());
    } else {
        &bytes
    };
    serde_json::from_slice(bytes).map_err(|e| {
        WebError::bad(format!("the JSON body is not as expected: {e}"))
            .api(true)
            .into_response()
    })
}

/// A short free text (a reason for the audit log): at most `max` characters, no control
/// characters, trimmed.
pub fn short_text(field: &str, value: &str, max: usize) -> Result<String, WebError> {
    let v = value.trim();
    if v.chars().count() > max {
        return Err(WebError::bad(format!(
            "{field}: at most {max} characters, please"
        )));
    }
    if v.chars().any(char::is_control) {
        return Err(WebError::bad(format!(
            "{field}: no line breaks or control characters, please"
        )));
    }
    Ok(v.to_owned())
}
