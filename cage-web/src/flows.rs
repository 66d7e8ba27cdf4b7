//! The flow log: a table refreshed by the script, filters by host, port and verdict,
//! downloads as JSON Lines and CSV; `GET /api/flows`.

use std::fmt::Write as _;
use std::net::IpAddr;

use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderValue};
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use serde::Deserialize;

use crate::auth::Authed;
use crate::backend::{FlowFilter, FlowRecord};
use crate::html::{self, esc};
use crate::{AppState, WebError};

/// Rows the page and the API give when no limit is asked for.
pub const DEFAULT_LIMIT: usize = 200;
/// The most a request may ask for (0 asks for all).
pub const MAX_LIMIT: usize = 1_000_000;

/// The query string as sent: every field optional, empty meaning "any".
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowQuery {
    #[serde(default)]
    host: String,
    #[serde(default)]
    port: String,
    #[serde(default)]
    verdict: String,
    #[serde(default)]
    limit: String,
}

/// The checked query: a filter and a limit, or what is wrong with it.
pub fn parse_query(
    raw: Option<&str>,
    default_limit: usize,
) -> Result<(FlowFilter, usize, FlowQuery), WebError> {
    let q: FlowQuery = serde_urlencoded::from_str(raw.unwrap_or("")).map_err(|e| {
        WebError::bad(format!(
            "the query is not as expected: {e}; give host, port, verdict, limit"
        ))
    })?;
    let host = optional::<IpAddr>(&q.host, "host", "an IP address, e.g. 192.168.10.11")?;
    let port = optional::<u16>(&q.port, "port", "a port number from 0 to 65535, e.g. 443")?;
    let verdict = match q.verdict.trim() {
        "" | "any" => None,
        v @ ("allowed" | "blocked") => Some(v.to_owned()),
        v => {
            return Err(WebError::bad(format!(
                "verdict: '{}' is not a verdict; give allowed or blocked",
                v.chars().take(60).collect::<String>()
            )))
        }
    };
    let limit = match q.limit.trim() {
        "" => default_limit,
        l => match l.parse::<usize>() {
            Ok(n) if n <= MAX_LIMIT => n,
            _ => {
                return Err(WebError::bad(format!(
                    "limit: '{}' is not a number of flows from 0 (all) to {MAX_LIMIT}",
                    l.chars().take(60).collect::<String>()
                )))
            }
        },
    };
    Ok((
        FlowFilter {
            host,
            port,
            verdict,
        },
        limit,
        q,
    ))
}

fn endpoint(ip: IpAddr, port: Option<u16>) -> String {
    match (ip, port) {
        (IpAddr::V6(a), Some(p)) => format!("[{a}]:{p}"),
        (a, Some(p)) => format!("{a}:{p}"),
        (a, None) => a.to_string(),
    }
}

/// The peer as the caged host named it (DNS) and its address.
fn peer_cell(f: &FlowRecord) -> String {
    let at = esc(&endpoint(f.peer, f.peer_port));
    match &f.name {
        Some(name) => format!("{} <span class=dim>{at}</span>", esc(name)),
        None => at,
    }
}

/// An optional query field: empty is `None`; otherwise it must parse as `T`, or the
/// error names the field, what was given (cut to 60 characters) and what is accepted.
fn optional<T: std::str::FromStr>(
    value: &str,
    field: &str,
    accepted: &str,
) -> Result<Option<T>, WebError> {
    match value.trim() {
        "" => Ok(None),
        v => v.parse::<T>().map(Some).map_err(|_| {
            WebError::bad(format!(
                "{field}: '{}' is not {accepted}",
                v.chars().take(60).collect::<String>()
            ))
        }),
    }
}

/// The table's rows, newest first.
pub(crate) fn rows(flows: &[FlowRecord]) -> String {
    let mut o = String::with_capacity(flows.len() * 300);
    for f in flows.iter().rev() {
        let _ = write!(
            o,
            "<tr class={}><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}{}</td><td class=num>{}</td><td class=num>{}</td></tr>",
            if f.verdict == "blocked" { "blocked" } else { "allowed" },
            esc(&html::rfc3339_short(&f.end)),
            esc(&f.verdict),
            esc(&f.proto),
            esc(&endpoint(f.host, f.host_port)),
            peer_cell(f),
            esc(f.rule.as_deref().unwrap_or("")),
            f.hostname.as_deref().map(|h| format!(" {}", esc(h))).unwrap_or_default(),
            esc(&html::bytes(f.bytes_out)),
            esc(&html::bytes(f.bytes_in)),
        );
    }
    o
}

pub async fn page(
    State(state): State<AppState>,
    authed: Authed,
    RawQuery(raw): RawQuery,
) -> Result<Html<String>, WebError> {
    let (filter, limit, q) = parse_query(raw.as_deref(), DEFAULT_LIMIT)?;
    let flows = state.backend.flows(filter, limit).await?;
    let query = serde_urlencoded::to_string([
        ("host", q.host.trim()),
        ("port", q.port.trim()),
        ("verdict", q.verdict.trim()),
        ("limit", &limit.to_string()),
    ])
    .unwrap_or_default();
    let all = serde_urlencoded::to_string([
        ("host", q.host.trim()),
        ("port", q.port.trim()),
        ("verdict", q.verdict.trim()),
        ("limit", "0"),
    ])
    .unwrap_or_default();
    let selected = |v: &str| {
        if q.verdict.trim() == v {
            " selected"
        } else {
            ""
        }
    };
    let body = format!(
        "<h1>Flows</h1>\
         <form method=get action=\"/flows\" class=filters id=flows-filter>\
         <label>Host <input name=host id=filter-host value=\"{}\" placeholder=\"192.168.10.11\"></label>\
         <label>Port <input name=port id=filter-port value=\"{}\" inputmode=numeric placeholder=443></label>\
         <label>Verdict <select name=verdict id=filter-verdict><option value=\"\">any</option>\
         <option value=allowed{}>allowed</option><option value=blocked{}>blocked</option></select></label>\
         <label>Newest <input name=limit id=filter-limit value=\"{limit}\" inputmode=numeric></label>\
         <button type=submit>Filter</button></form>\
         <p class=downloads>Download: <a id=download-jsonl href=\"/flows.jsonl?{all}\">JSON Lines</a> · \
         <a id=download-csv href=\"/flows.csv?{all}\">CSV</a> \
         <span id=flows-live class=muted>({} shown, newest first)</span></p>\
         <div class=scroll><table id=flows-table data-query=\"{}\"><thead><tr><th>last seen</th><th>verdict</th><th>proto</th>\
         <th>caged host</th><th>peer</th><th>rule / name</th><th>up</th><th>down</th></tr></thead>\
         <tbody id=flows-body>{}</tbody></table></div>",
        esc(q.host.trim()),
        esc(q.port.trim()),
        selected("allowed"),
        selected("blocked"),
        flows.len(),
        esc(&query),
        rows(&flows),
    );
    Ok(html::page("Flows", "flows", &authed.session.csrf, &body))
}

fn attachment(body: String, content_type: &'static str, name: &'static str) -> Response {
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CONTENT_DISPOSITION, HeaderValue::from_static(name));
    r
}

/// The flows a download asks for: all that match, unless it names a limit.
async fn to_download(state: &AppState, raw: Option<&str>) -> Result<Vec<FlowRecord>, WebError> {
    let (filter, limit, _) = parse_query(raw, 0)?;
    Ok(state.backend.flows(filter, limit).await?)
}

pub async fn download_jsonl(
    State(state): State<AppState>,
    _: Authed,
    RawQuery(raw): RawQuery,
) -> Result<Response, WebError> {
    let flows = to_download(&state, raw.as_deref()).await?;
    let mut o = String::with_capacity(flows.len() * 300);
    for f in &flows {
        if let Ok(line) = serde_json::to_string(f) {
            o.push_str(&line);
            o.push('\n');
        }
    }
    Ok(attachment(
        o,
        "application/x-ndjson",
        "attachment; filename=\"cage-flows.jsonl\"",
    ))
}

/// One CSV field (RFC 4180 quoting). A field that a spreadsheet would run as a formula
/// (a caged host chooses its own DHCP name) is prefixed with `'`.
fn csv_field(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{s}")
    } else {
        s.to_owned()
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

pub const CSV_HEADER: &str = "start,end,verdict,rule,proto,host,host_port,mac,bridge_port,hostname,peer,peer_port,name,direction,packets_out,bytes_out,packets_in,bytes_in,tag,tcp_flags";

pub fn csv(flows: &[FlowRecord]) -> String {
    let mut o = String::with_capacity(flows.len() * 200);
    o.push_str(CSV_HEADER);
    o.push_str("\r\n");
    let opt = |v: &Option<String>| csv_field(v.as_deref().unwrap_or(""));
    let port = |p: Option<u16>| p.map(|p| p.to_string()).unwrap_or_default();
    for f in flows {
        let _ = write!(
            o,
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}\r\n",
            csv_field(&f.start),
            csv_field(&f.end),
            csv_field(&f.verdict),
            opt(&f.rule),
            csv_field(&f.proto),
            f.host,
            port(f.host_port),
            opt(&f.mac),
            opt(&f.bridge_port),
            opt(&f.hostname),
            f.peer,
            port(f.peer_port),
            opt(&f.name),
            csv_field(&f.direction),
            f.packets_out,
            f.bytes_out,
            f.packets_in,
            f.bytes_in,
            opt(&f.tag),
            opt(&f.tcp_flags),
        );
    }
    o
}

pub async fn download_csv(
    State(state): State<AppState>,
    _: Authed,
    RawQuery(raw): RawQuery,
) -> Result<Response, WebError> {
    let flows = to_download(&state, raw.as_deref()).await?;
    Ok(attachment(
        csv(&flows),
        "text/csv; charset=utf-8",
        "attachment; filename=\"cage-flows.csv\"",
    ))
}

/// `GET /api/flows?host=&port=&verdict=&limit=`: the newest flows, oldest first.
pub async fn api_flows(
    State(state): State<AppState>,
    _: Authed,
    RawQuery(raw): RawQuery,
) -> Result<Json<Vec<FlowRecord>>, WebError> {
    let (filter, limit, _) =
        parse_query(raw.as_deref(), DEFAULT_LIMIT).map_err(WebError::for_api)?;
    let flows = state
        .backend
        .flows(filter, limit)
        .await
        .map_err(WebError::for_api)?;
    Ok(Json(flows))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes_and_defuses_formulas() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("=cmd|' /C calc'!A0"), "'=cmd|' /C calc'!A0");
    }

    #[test]
    fn queries() {
        assert!(parse_query(None, 7).is_ok_and(|(f, l, _)| f == FlowFilter::default() && l == 7));
        let (f, l, _) = parse_query(
            Some("host=192.168.10.11&port=443&verdict=blocked&limit=5"),
            7,
        )
        .unwrap();
        assert_eq!(f.port, Some(443));
        assert_eq!(l, 5);
        for bad in [
            "host=x",
            "port=70000",
            "verdict=maybe",
            "limit=-1",
            "limit=99999999999",
            "other=1",
        ] {
            assert!(parse_query(Some(bad), 7).is_err(), "{bad}");
        }
    }
}
