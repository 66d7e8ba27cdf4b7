//! Login, first-run setup and logout, as pages and as `POST /api/login`.
//!
//! The login and setup forms have no session yet; their CSRF token is a random value in
//! the `cage_pre` cookie that the form must repeat (double submit). Failed logins back
//! off per client address and globally (`session::Limiter`).

use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{FromRequest, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;

use crate::auth::{self, ApiJson, Authed, PageForm};
use crate::html::{self, esc};
use crate::session::{self, Active};
use crate::{AppState, WebError};

fn session_cookie(token: &str) -> String {
    format!(
        "{}={token}; Secure; HttpOnly; SameSite=Strict; Path=/; Max-Age={}",
        session::COOKIE,
        session::ABSOLUTE.as_secs()
    )
}

fn pre_cookie(token: &str) -> String {
    format!(
        "{}={token}; Secure; HttpOnly; SameSite=Strict; Path=/; Max-Age=3600",
        session::PRE_COOKIE
    )
}

fn expired(name: &str) -> String {
    format!("{name}=; Secure; HttpOnly; SameSite=Strict; Path=/; Max-Age=0")
}

fn with_cookie(mut r: Response, cookie: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(cookie) {
        r.headers_mut().append(header::SET_COOKIE, v);
    }
    r
}

/// A form page of its own with a fresh `cage_pre` token.
fn pre_form(status: StatusCode, title: &str, form: impl FnOnce(&str) -> String) -> Response {
    let token = session::random_token();
    let body = form(&token);
    with_cookie(
        (status, html::bare_page(title, &body)).into_response(),
        &pre_cookie(&token),
    )
}

fn error_p(message: Option<&str>) -> String {
    message
        .map(|m| format!("<p class=error id=error>{}</p>", esc(m)))
        .unwrap_or_default()
}

fn login_form(status: StatusCode, message: Option<&str>) -> Response {
    pre_form(status, "Log in", |token| {
        format!(
            "<h1>Log in</h1>{}<form id=login-form method=post action=\"/login\">{}\
             <label for=password>Password</label>\
             <input id=password name=password type=password autocomplete=current-password required autofocus>\
             <button id=login-submit type=submit>Log in</button></form>",
            error_p(message),
            html::csrf_field(token)
        )
    })
}

fn setup_form(status: StatusCode, message: Option<&str>) -> Response {
    pre_form(status, "Set a password", |token| {
        format!(
            "<h1>Welcome to Cage</h1><p>Set the password of this page. It protects the \
             kill switch and the settings; at least {} characters.</p>{}\
             <form id=setup-form method=post action=\"/setup\">{}\
             <label for=password>Password</label>\
             <input id=password name=password type=password autocomplete=new-password minlength={} required autofocus>\
             <label for=confirm>Password again</label>\
             <input id=confirm name=confirm type=password autocomplete=new-password required>\
             <button id=setup-submit type=submit>Set password</button></form>",
            session::MIN_PASSWORD,
            error_p(message),
            html::csrf_field(token),
            session::MIN_PASSWORD
        )
    })
}

pub async fn login_page(State(state): State<AppState>) -> Response {
    if state.backend.password_hash().await.is_none() {
        return Redirect::to("/setup").into_response();
    }
    login_form(StatusCode::OK, None)
}

pub async fn setup_page(State(state): State<AppState>) -> Response {
    if state.backend.password_hash().await.is_some() {
        return Redirect::to("/login").into_response();
    }
    setup_form(StatusCode::OK, None)
}

#[derive(Deserialize)]
struct LoginForm {
    password: String,
}

#[derive(Deserialize)]
struct SetupForm {
    password: String,
    confirm: String,
}

/// The body of a form without a session: the `cage_pre` token checked first (403), then
/// the fields parsed (400).
async fn pre_checked<T: serde::de::DeserializeOwned>(
    req: Request,
    state: &AppState,
) -> Result<(std::net::IpAddr, T), Response> {
    let (parts, body) = req.into_parts();
    let ip = auth::client_ip(&parts);
    let pre = auth::cookie(&parts.headers, session::PRE_COOKIE).map(str::to_owned);
    let bytes = Bytes::from_request(Request::from_parts(parts, body), state)
        .await
        .map_err(|e| WebError::new(e.status(), e.body_text()).into_response())?;
    let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(&bytes).unwrap_or_default();
    let sent = pairs
        .iter()
        .find(|(k, _)| k == "csrf")
        .map(|(_, v)| v.as_str());
    match (pre, sent) {
        (Some(p), Some(s)) if !p.is_empty() && session::same(&p, s) => {}
        _ => return Err(auth::csrf_refused(false)),
    }
    let value: T = serde_urlencoded::from_bytes(&bytes)
        .map_err(|e| WebError::bad(format!("the form is not as expected: {e}")).into_response())?;
    Ok((ip, value))
}

/// The backoff, then the password: `Ok` with a new session, or the refusal.
async fn try_login(
    state: &AppState,
    ip: std::net::IpAddr,
    password: String,
    api: bool,
) -> Result<Active, WebError> {
    let allowed = state.limiter().check(ip, Instant::now());
    if let Err(wait) = allowed {
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        let mut e = WebError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!("too many failed logins; try again in {secs} s"),
        )
        .api(api);
        e.retry_after = Some(secs);
        return Err(e);
    }
    if password.len() > session::MAX_PASSWORD {
        state.limiter().failure(ip, Instant::now());
        return Err(WebError::new(StatusCode::UNAUTHORIZED, "wrong password").api(api));
    }
    let Some(hash) = state.backend.password_hash().await else {
        return Err(WebError::new(
            StatusCode::CONFLICT,
            "no password is set yet: set one at /setup or with `cage passwd`",
        )
        .api(api));
    };
    // Hashing takes a good fraction of a second on a router: not on the async threads.
    let ok = state
        .argon2(move || session::verify_password(&password, &hash))
        .await
        .unwrap_or(false);
    if !ok {
        state.limiter().failure(ip, Instant::now());
        state
            .backend
            .event(&format!("web page: failed login from {ip}"));
        state.backend.audit_login(format!("web:{ip}"), false).await;
        return Err(WebError::new(StatusCode::UNAUTHORIZED, "wrong password").api(api));
    }
    state.limiter().success(ip);
    state.backend.event(&format!("web page: login from {ip}"));
    state.backend.audit_login(format!("web:{ip}"), true).await;
    Ok(state.sessions().create(Instant::now()))
}

/// The session's cookie set, the pre-session's expired, and on to `to`.
fn logged_in(active: &Active, to: &str) -> Response {
    let r = with_cookie(
        Redirect::to(to).into_response(),
        &session_cookie(&active.token),
    );
    with_cookie(r, &expired(session::PRE_COOKIE))
}

pub async fn login(State(state): State<AppState>, req: Request) -> Response {
    let (ip, form) = match pre_checked::<LoginForm>(req, &state).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    match try_login(&state, ip, form.password, false).await {
        Ok(active) => logged_in(&active, "/"),
        Err(e) if e.status == StatusCode::UNAUTHORIZED => {
            login_form(StatusCode::UNAUTHORIZED, Some("Wrong password."))
        }
        Err(e) if e.status == StatusCode::CONFLICT => Redirect::to("/setup").into_response(),
        Err(e) => {
            let retry = e.retry_after;
            let mut r = login_form(e.status, Some(&e.message));
            if let Some(s) = retry.and_then(|s| HeaderValue::from_str(&s.to_string()).ok()) {
                r.headers_mut().insert(header::RETRY_AFTER, s);
            }
            r
        }
    }
}

pub async fn setup(State(state): State<AppState>, req: Request) -> Response {
    let _one = state.setup.lock().await;
    if state.backend.password_hash().await.is_some() {
        return WebError::forbidden("a password is already set: log in at /login").into_response();
    }
    let (ip, form) = match pre_checked::<SetupForm>(req, &state).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    if let Some(problem) = session::password_problem(&form.password, &form.confirm) {
        return setup_form(StatusCode::BAD_REQUEST, Some(&problem));
    }
    let password = form.password;
    let hashed = state
        .argon2(move || session::hash_password(&password))
        .await
        .unwrap_or_else(|| Err("cannot hash the password now; try again".into()));
    let phc = match hashed {
        Ok(h) => h,
        Err(e) => return WebError::new(StatusCode::SERVICE_UNAVAILABLE, e).into_response(),
    };
    if let Err(e) = state.backend.set_password_hash(phc).await {
        return WebError::from(e).into_response();
    }
    state.backend.event(&format!(
        "web page: the password was set by the first-run setup from {ip}"
    ));
    let active = state.sessions().create(Instant::now());
    // On to the first-run page: where to plug the agent in, the AI Wi-Fi, the self-test.
    logged_in(&active, "/first-run")
}

#[derive(Deserialize)]
pub struct NoFields {}

pub async fn logout(
    State(state): State<AppState>,
    PageForm(authed, NoFields {}): PageForm<NoFields>,
) -> Response {
    logged_out(&state, &authed, Redirect::to("/login").into_response())
}

/// The session of `authed` ended, and `answer` with its cookie expired.
fn logged_out(state: &AppState, authed: &Authed, answer: Response) -> Response {
    state.sessions().remove(&authed.session.token);
    with_cookie(answer, &expired(session::COOKIE))
}

#[derive(Deserialize)]
struct ApiLogin {
    password: String,
}

/// `POST /api/login {"password": "…"}` → `{"csrf": "…"}` and the session cookie.
pub async fn api_login(State(state): State<AppState>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let ip = auth::client_ip(&parts);
    let req = Request::from_parts(parts, body);
    let body: ApiLogin = match auth::json_body(req, &state).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    match try_login(&state, ip, body.password, true).await {
        Ok(active) => with_cookie(
            axum::Json(serde_json::json!({ "csrf": active.csrf })).into_response(),
            &session_cookie(&active.token),
        ),
        Err(e) => e.into_response(),
    }
}

pub async fn api_logout(
    State(state): State<AppState>,
    ApiJson(authed, NoFields {}): ApiJson<NoFields>,
) -> Response {
    let ok = axum::Json(serde_json::json!({ "ok": true })).into_response();
    logged_out(&state, &authed, ok)
}
