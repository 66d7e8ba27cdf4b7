//! The configuration file is untrusted input (edited by hand, by `uci`, by the web UI):
//! parsing and validating any bytes must not panic, and every configuration that
//! validates must render to a ruleset and print without panicking.
#![no_main]

use cage_policy::{config, policy, text};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match config::parse(text) {
        Ok(cfg) => {
            let facts = policy::Facts {
                wan_devices: vec!["wan".into()],
                upstream4: vec!["10.99.0.0/24".parse().unwrap()],
                upstream6: vec![],
                bridge_meta: data.len() % 2 == 0,
                ..Default::default()
            };
            let rs = policy::render(&cfg, &facts);
            let _ = text::to_text(&rs);
            let _ = text::to_json(&rs);
        }
        Err(errors) => {
            // Every error must render (it is what the user reads).
            let _ = errors.to_string();
        }
    }
});
