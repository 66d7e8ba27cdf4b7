//! Cage's LAN web page and JSON API: an axum router over a [`Backend`].
//!
//! *Only `cage-web` knows HTTP.* It renders the pages on the server (one small CSS and one
//! small script, embedded, served from `/assets/`), keeps sessions in memory, and asks the
//! agent for everything else through [`Backend`], which `cage-agent` implements with the
//! real kill switch, flow log and configuration. The page sits next to a hostile host, so
//! every request passes [`security::guard`] (Host and Origin checks, security headers)
//! and every change needs a session and its CSRF token ([`auth`]).

pub mod alerts;
pub mod assets;
pub mod auth;
pub mod backend;
pub mod charts;
#[cfg(feature = "client")]
pub mod client;
pub mod dashboard;
pub mod error;
pub mod firstrun;
pub mod flows;
pub mod hosts;
pub mod html;
pub mod listener;
pub mod login;
pub mod machines;
pub mod metrics;
pub mod pictures;
pub mod port;
pub mod qr;
pub mod review;
pub mod security;
pub mod session;
pub mod settings;
pub mod tls;

use std::sync::{Arc, Mutex, MutexGuard};

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;

pub use backend::{
    Access, AiPort, AiWifi, Alert, AuditEntry, Backend, BackendError, Binding, CageState,
    FlowFilter, FlowRecord, Metrics, MetricsAccess, RefusedName, Review, Segment, SelfTest,
    Settings, Status,
};
pub use error::WebError;
pub use machines::{Machine, Machines};
pub use session::{hash_password, password_problem, verify_password};

/// Request bodies larger than this are refused (413): every form and JSON body of the
/// page is a few hundred bytes.
pub const BODY_LIMIT: usize = 16 * 1024;

/// What every handler shares: the agent and the in-memory sessions.
#[derive(Clone)]
pub struct AppState {
    pub backend: Arc<dyn Backend>,
    sessions: Arc<Mutex<session::Sessions>>,
    limiter: Arc<Mutex<session::Limiter>>,
    /// Held while the first-run setup sets the password, so two cannot race.
    setup: Arc<tokio::sync::Mutex<()>>,
    /// One argon2 computation at a time: each takes 19 MiB, and a router has little
    /// memory; a burst of logins waits rather than running the router out of memory.
    argon2: Arc<tokio::sync::Semaphore>,
    /// The backoff for wrong `/metrics` tokens, apart from the logins'.
    metrics_gate: Arc<Mutex<metrics::Gate>>,
}

impl AppState {
    pub fn new(backend: Arc<dyn Backend>) -> AppState {
        AppState {
            backend,
            sessions: Arc::default(),
            limiter: Arc::default(),
            setup: Arc::default(),
            argon2: Arc::new(tokio::sync::Semaphore::new(1)),
            metrics_gate: Arc::default(),
        }
    }

    /// Run `f` (an argon2 hash or verification) off the async thread, one at a time;
    /// `None` if it could not run.
    pub(crate) async fn argon2<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        let _one = self.argon2.acquire().await.ok()?;
        tokio::task::spawn_blocking(f).await.ok()
    }

    /// The sessions. A poisoned lock is taken as it is: its data is a map that a panic
    /// cannot leave half-written in a way that matters (and `cage` aborts on panic).
    pub(crate) fn sessions(&self) -> MutexGuard<'_, session::Sessions> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn limiter(&self) -> MutexGuard<'_, session::Limiter> {
        self.limiter.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn metrics_gate(&self) -> MutexGuard<'_, metrics::Gate> {
        self.metrics_gate.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Every route of the page and the API, in one place.
pub fn router(state: AppState) -> Router {
    Router::new()
        // Without a session.
        .route("/login", get(login::login_page).post(login::login))
        .route("/setup", get(login::setup_page).post(login::setup))
        .route("/assets/cage.css", get(assets::css))
        .route("/assets/cage.js", get(assets::js))
        .route("/api/login", post(login::api_login))
        // Pages.
        .route("/", get(dashboard::page))
        .route("/isolate", post(dashboard::isolate))
        .route("/release", post(dashboard::release))
        .route("/hosts", get(hosts::page))
        .route("/hosts/{mac}", get(hosts::machine_page))
        .route("/flows", get(flows::page))
        .route("/flows.jsonl", get(flows::download_jsonl))
        .route("/flows.csv", get(flows::download_csv))
        .route("/alerts", get(alerts::page))
        .route("/dns", get(review::page))
        .route("/dns/allow", post(review::allow))
        .route("/port", get(port::page).post(port::set))
        .route("/first-run", get(firstrun::page))
        .route("/first-run/port", post(firstrun::set_port))
        .route("/first-run/selftest", post(firstrun::selftest))
        .route("/settings", get(settings::page).post(settings::apply))
        .route("/settings/password", post(settings::password))
        .route("/logout", post(login::logout))
        // The JSON API.
        .route("/api/logout", post(login::api_logout))
        .route("/api/state", get(dashboard::api_state))
        .route("/api/isolate", post(dashboard::api_isolate))
        .route("/api/release", post(dashboard::api_release))
        .route("/api/flows", get(flows::api_flows))
        .route("/api/hosts", get(hosts::api_hosts))
        .route("/api/hosts/{mac}", get(hosts::api_machine))
        .route("/api/audit", get(alerts::api_audit))
        .route("/api/alerts", get(alerts::api_alerts))
        .route("/api/dns", get(review::api_review))
        .route("/api/port", get(port::api_port))
        .route("/api/dns/allow", post(review::api_allow))
        // For scrapers: a bearer token or an allowed address, no session.
        .route("/metrics", get(metrics::metrics))
        .fallback(security::not_found)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        // Inside the guard: plain HTTP gets its redirect after the Host check.
        .layer(axum::middleware::from_fn(tls::only_https))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            security::guard,
        ))
        .with_state(state)
}

/// Serve the page in plain HTTP on `listeners` (at least one) until `shutdown`
/// completes: the unit tests' server. `cage run` serves with [`serve_https`].
pub async fn serve(
    listeners: Vec<tokio::net::TcpListener>,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_on(listener::Bounded::new(listeners), state, shutdown).await
}

/// Serve the page over HTTPS with `tls` on `listeners` (at least one) until `shutdown`
/// completes; a plain-HTTP request on the same port is only redirected to HTTPS.
pub async fn serve_https(
    listeners: Vec<tokio::net::TcpListener>,
    tls: &tls::Identity,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let acceptor = tls::TlsAcceptor::from(tls.config.clone());
    serve_on(
        listener::Bounded::with_tls(listeners, acceptor),
        state,
        shutdown,
    )
    .await
}

async fn serve_on(
    listener: listener::Bounded,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(
        listener,
        router(state).into_make_service_with_connect_info::<listener::Peer>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

#[cfg(test)]
mod tests;
