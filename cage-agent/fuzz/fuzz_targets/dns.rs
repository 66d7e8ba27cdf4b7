//! DNS messages are untrusted input twice over: queries come from the caged hosts, which
//! are hostile, and answers from upstream. Whatever the bytes, the forwarder's parsing
//! (the query's name, a refusal of it, the addresses learned from an answer and the answer
//! with its TTLs cut) must not panic, and what it learns must respect the TTL bounds.
#![no_main]

use cage_policy::config::Dns;
use cage_policy::dns::{message, name};
use libfuzzer_sys::fuzz_target;
use simple_dns::RCODE;

fuzz_target!(|data: &[u8]| {
    let dns = Dns {
        ttl_floor: 60,
        ttl_max: 3600,
        ..Dns::default()
    };
    if let Some(qname) = message::query_name(data) {
        let _ = name::any_matches(&dns.doh_block, &qname);
    }
    let _ = message::refusal(data, RCODE::Refused);
    let (addrs, capped) = message::digest(data, &dns);
    for (_, ttl) in &addrs {
        assert!((60..=3600).contains(ttl), "ttl {ttl} out of bounds");
    }
    if let Some(bytes) = capped {
        // What is relayed instead must itself be a message with no TTL above the cap.
        let (again, _) = message::digest(&bytes, &dns);
        assert_eq!(again.len(), addrs.len());
    }
});
