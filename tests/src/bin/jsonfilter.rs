//! The lab's stand-in for OpenWrt's `jsonfilter` (see `cage_tests::jsonfilter`), put
//! into the OpenWrt root by `cage_tests::owlab`. Options as the tool's: `-i FILE`,
//! `-s JSON`, `-a`, `-e PATTERN`, `-t PATTERN`, `-F SEP`, `-l N`, `-q`, each `-e`/`-t`
//! evaluated in turn; 1 when one of them matched nothing, 125/126 when the input cannot
//! be read or parsed. Like the tool, it reads the first JSON value of the input and
//! ignores what follows it.

use std::io::{Read, Write};
use std::process::ExitCode;

use cage_tests::jsonfilter::{render, render_types, Pattern};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut quiet = false;
    let mut array = false;
    let mut file: Option<String> = None;
    let mut source: Option<String> = None;
    let mut separator = " ".to_owned();
    let mut limit = i32::MAX as usize;
    let mut doc: Option<serde_json::Value> = None;
    let mut rc = 0u8;
    let mut out = String::new();
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        i += 1;
        let Some(opt) = arg.strip_prefix('-').and_then(|o| o.chars().next()) else {
            continue;
        };
        let value = |i: &mut usize| -> Option<String> {
            if arg.len() > 2 {
                Some(arg[2..].to_owned())
            } else {
                *i += 1;
                args.get(*i - 1).cloned()
            }
        };
        match opt {
            'q' => quiet = true,
            'a' => array = true,
            'i' => file = value(&mut i),
            's' => source = value(&mut i),
            'F' => {
                if let Some(v) = value(&mut i).filter(|v| !v.is_empty()) {
                    separator = v;
                }
            }
            'l' => limit = value(&mut i).and_then(|v| v.parse().ok()).unwrap_or(0),
            'e' | 't' => {
                let Some(expr) = value(&mut i) else {
                    return fail(quiet, "option requires an argument", 1);
                };
                if doc.is_none() {
                    let text = match (&source, &file) {
                        (Some(s), _) => s.clone(),
                        (None, Some(f)) => match std::fs::read_to_string(f) {
                            Ok(t) => t,
                            Err(e) => return fail(quiet, &format!("Failed to open {f}: {e}"), 125),
                        },
                        (None, None) => {
                            let mut t = String::new();
                            let _ = std::io::stdin().read_to_string(&mut t);
                            t
                        }
                    };
                    let parsed = if array {
                        serde_json::Deserializer::from_str(&text)
                            .into_iter::<serde_json::Value>()
                            .collect::<Result<Vec<_>, _>>()
                            .map(serde_json::Value::Array)
                    } else {
                        // The first value; what follows it is ignored, as json-c's
                        // tokener does (network.sh's `${__NETWORK_CACHE:-{}}` leaves a
                        // stray `}` after the cached dump).
                        serde_json::Deserializer::from_str(&text)
                            .into_iter::<serde_json::Value>()
                            .next()
                            .unwrap_or_else(|| serde_json::from_str(""))
                    };
                    match parsed {
                        Ok(d) => doc = Some(d),
                        Err(e) => {
                            return fail(quiet, &format!("Failed to parse json data: {e}"), 126)
                        }
                    }
                }
                let pattern = match Pattern::parse(&expr) {
                    Ok(p) => p,
                    Err(e) => {
                        if !quiet {
                            eprintln!("Syntax error: {e}");
                        }
                        rc = 1;
                        continue;
                    }
                };
                let matches = pattern.matches(doc.as_ref().unwrap());
                if matches.is_empty() {
                    rc = 1;
                }
                out.push_str(&if opt == 't' {
                    if matches.is_empty() {
                        String::new()
                    } else {
                        render_types(&pattern, &matches, limit)
                    }
                } else {
                    render(&pattern, &matches, &separator, limit)
                });
            }
            _ => return fail(quiet, &format!("invalid option -- '{opt}'"), 1),
        }
    }
    let _ = std::io::stdout().write_all(out.as_bytes());
    ExitCode::from(rc)
}

fn fail(quiet: bool, msg: &str, rc: u8) -> ExitCode {
    if !quiet {
        eprintln!("{msg}");
    }
    ExitCode::from(rc)
}
