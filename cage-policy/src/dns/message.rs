//! DNS messages as the forwarder reads and writes them, without the network: the name a
//! query asks for, the refusal of a query, and what an upstream answer teaches (its
//! addresses, their TTLs floored and capped, the answer rebuilt with its TTLs cut).
//! Messages are parsed and built with `simple-dns`. The fuzz target `dns` drives these.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use simple_dns::{Packet, PacketFlag, RCODE};

use crate::config::Dns;

/// A reply to `query` with no records and `rcode`.
pub fn reply(query: &Packet, rcode: RCODE) -> Option<Vec<u8>> {
    let mut r = Packet::new_reply(query.id());
    r.questions = query.questions.clone();
    if query.has_flags(PacketFlag::RECURSION_DESIRED) {
        r.set_flags(PacketFlag::RECURSION_DESIRED);
    }
    r.set_flags(PacketFlag::RECURSION_AVAILABLE);
    *r.rcode_mut() = rcode;
    r.build_bytes_vec().ok()
}

/// What an upstream answer means: its A and AAAA addresses with their TTL (floored at
/// `ttl_floor`, cut to `ttl_max`), and the answer rebuilt with its TTLs cut, if any was
/// above `ttl_max`. An answer that does not parse teaches nothing and is relayed as it
/// is (the host's resolver judges it). Pure: the fuzz target `dns` drives it.
pub fn digest(response: &[u8], dns: &Dns) -> (Vec<(IpAddr, u32)>, Option<Vec<u8>>) {
    let Ok(p) = Packet::parse(response) else {
        return (Vec::new(), None);
    };
    let addrs = p
        .answers
        .iter()
        .filter_map(|rr| {
            let ip = match &rr.rdata {
                simple_dns::rdata::RData::A(a) => IpAddr::V4(Ipv4Addr::from(a.address)),
                simple_dns::rdata::RData::AAAA(a) => IpAddr::V6(Ipv6Addr::from(a.address)),
                _ => return None,
            };
            Some((ip, rr.ttl.min(dns.ttl_max).max(dns.ttl_floor).max(1)))
        })
        .collect();
    (addrs, cap_ttls(p, dns.ttl_max))
}

/// A query from a caged host, if the bytes are one: not a response, exactly one
/// question. Its name in lower case. Pure: the fuzz target `dns` drives it.
pub fn query_name(query: &[u8]) -> Option<String> {
    match Packet::parse(query) {
        Ok(p) if !p.has_flags(PacketFlag::RESPONSE) && p.questions.len() == 1 => {
            Some(p.questions[0].qname.to_string().to_ascii_lowercase())
        }
        _ => None,
    }
}

/// The refusal of a query (REFUSED, NXDOMAIN, SERVFAIL), if the bytes are a query.
pub fn refusal(query: &[u8], rcode: RCODE) -> Option<Vec<u8>> {
    reply(&Packet::parse(query).ok()?, rcode)
}

/// How long a learned address stays in the allow set: its TTL (floored and capped) and
/// half as much again, so that lookups of the same name within that slack need no nft
/// run (the set still keeps the address at least as long as the answer's TTL).
pub fn with_slack(ttl: u32) -> u32 {
    ttl.saturating_add(ttl / 2)
}

/// The response rebuilt with every TTL at most `max`, or `None` if none is above it.
fn cap_ttls(mut p: Packet, max: u32) -> Option<Vec<u8>> {
    let over = |p: &Packet| {
        p.answers
            .iter()
            .chain(&p.name_servers)
            .chain(&p.additional_records)
            .any(|r| r.ttl > max)
    };
    if !over(&p) {
        return None;
    }
    for r in p
        .answers
        .iter_mut()
        .chain(p.name_servers.iter_mut())
        .chain(p.additional_records.iter_mut())
    {
        r.ttl = r.ttl.min(max);
    }
    p.build_bytes_vec_compressed().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use simple_dns::rdata::{RData, A};
    use simple_dns::{Name, Question, ResourceRecord, CLASS, QCLASS, QTYPE, TYPE};

    fn answer_with_ttl(ttl: u32) -> Vec<u8> {
        let mut p = Packet::new_reply(7);
        p.questions.push(Question::new(
            Name::new_unchecked("a.example"),
            QTYPE::TYPE(TYPE::A),
            QCLASS::CLASS(CLASS::IN),
            false,
        ));
        p.answers.push(ResourceRecord::new(
            Name::new_unchecked("a.example"),
            CLASS::IN,
            ttl,
            RData::A(A::from(Ipv4Addr::new(203, 0, 113, 20))),
        ));
        p.build_bytes_vec().unwrap()
    }

    #[test]
    fn ttls_above_the_cap_are_cut_and_others_left_alone() {
        let long = answer_with_ttl(86400);
        let capped = cap_ttls(Packet::parse(&long).unwrap(), 3600).expect("rebuilt");
        let p = Packet::parse(&capped).unwrap();
        assert_eq!(p.id(), 7);
        assert_eq!(p.answers[0].ttl, 3600);
        assert!(matches!(p.answers[0].rdata, RData::A(_)));
        let short = answer_with_ttl(60);
        assert!(cap_ttls(Packet::parse(&short).unwrap(), 3600).is_none());
        assert_eq!(with_slack(60), 90);
        assert_eq!(with_slack(u32::MAX), u32::MAX);
    }

    #[test]
    fn refusals_answer_the_question_with_the_code() {
        let mut q = Packet::new_query(99);
        q.set_flags(PacketFlag::RECURSION_DESIRED);
        q.questions.push(Question::new(
            Name::new_unchecked("x.example"),
            QTYPE::TYPE(TYPE::AAAA),
            QCLASS::CLASS(CLASS::IN),
            false,
        ));
        let bytes = q.build_bytes_vec().unwrap();
        let q = Packet::parse(&bytes).unwrap();
        let r = reply(&q, RCODE::Refused).unwrap();
        let r = Packet::parse(&r).unwrap();
        assert_eq!(r.id(), 99);
        assert!(r.has_flags(PacketFlag::RESPONSE | PacketFlag::RECURSION_DESIRED));
        assert_eq!(r.rcode(), RCODE::Refused);
        assert_eq!(r.questions[0].qname.to_string(), "x.example");
        assert!(r.answers.is_empty());
    }
}
