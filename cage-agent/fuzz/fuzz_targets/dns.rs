//! DNS messages are untrusted input twice over: queries come from the caged hosts, which
//! are hostile, and answers from upstream. Whatever the bytes, the forwarder's parsing
//! (the query's name, a refusal of it, the addresses learned from an answer and the answer
//! with its TTLs cut) must not panic, and what it learns must respect the TTL bounds.
#![no_main]

use cage_agent::config::Dns;
use cage_agent::dns::forwarder;
use libfuzzer_sys::fuzz_target;
use simple_dns::RCODE;

fuzz_target!(|data: &[u8]| {
    let dns = Dns {
        ttl_floor: 60,
        ttl_max: 3600,
        ..Dns::default()
    };
    if let Some(name) = forwarder::query_name(data) {
        let _ = cage_agent::dns::name::any_matches(&dns.doh_block, &name);
    }
    let _ = forwarder::refusal(data, RCODE::Refused);
    let (addrs, capped) = forwarder::digest(data, &dns);
    for (_, ttl) in &addrs {
        assert!((60..=3600).contains(ttl), "ttl {ttl} out of bounds");
    }
    if let Some(bytes) = capped {
        // What is relayed instead must itself be a message with no TTL above the cap.
        let (again, _) = forwarder::digest(&bytes, &dns);
        assert_eq!(again.len(), addrs.len());
    }
});
