//! IPFIX messages (RFC 7011) from flow records: the two templates (IPv4 and IPv6) and
//! the data records, packed into messages that each fit one UDP datagram under the path
//! MTU. Pure: bytes in, bytes out; the exporter sends them.
//!
//! One record a flow, bidirectional (RFC 5103): the forward counters (`octetDeltaCount`,
//! `packetDeltaCount`, `tcpControlBits`) are what the caged host sent, the reverse ones
//! (the same elements under PEN 29305) what it received, so a record carries exactly
//! the flow log's `bytes_out`/`packets_out`/`bytes_in`/`packets_in`. nfdump 1.7 reads
//! the reverse counters as its "out" bytes and packets.

use std::net::IpAddr;

use cage_common::records::FlowRecord;

pub const VERSION: u16 = 10;
pub const HEADER_LEN: usize = 16;
/// A message is at most this long: with the IPv6 and UDP headers (48 bytes) it stays
/// under an Ethernet MTU of 1500 and under most tunnels' too, so nothing is fragmented.
pub const MAX_MESSAGE: usize = 1400;
pub const TEMPLATE_SET_ID: u16 = 2;
pub const TEMPLATE_V4: u16 = 256;
pub const TEMPLATE_V6: u16 = 257;
/// RFC 5103's Private Enterprise Number for reverse information elements.
pub const PEN_REVERSE: u32 = 29305;
/// Cage's own elements, under IANA's documentation PEN (RFC 5612): Cage has no PEN of
/// its own, and this one is reserved for exactly such use, so it can clash with no
/// vendor's.
pub const PEN_CAGE: u32 = 32473;
/// Variable length (RFC 7011 §7).
pub const VARIABLE: u16 = 0xffff;
/// The longest text put into a record (a DNS name is at most 253 bytes): with it, every
/// record fits one message.
pub const MAX_TEXT: usize = 253;

/// Cage's elements under [`PEN_CAGE`].
pub mod cage_ie {
    /// unsigned8: 1 allowed, 2 blocked.
    pub const VERDICT: u16 = 1;
    /// string: the rule that blocked the flow (`deny:lan`); empty when allowed.
    pub const RULE: u16 = 2;
    /// string: the DNS name the caged host resolved for the peer.
    pub const NAME: u16 = 3;
    /// string: the caged host's name from its DHCP lease.
    pub const HOSTNAME: u16 = 4;
    /// string: `selftest` for `cage selftest`'s probe traffic.
    pub const TAG: u16 = 5;
}

/// One field of a template: an information element, its length, its enterprise (0 for
/// IANA's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field {
    pub id: u16,
    pub len: u16,
    pub pen: u32,
}

const fn ie(id: u16, len: u16) -> Field {
    Field { id, len, pen: 0 }
}

const fn rev(id: u16, len: u16) -> Field {
    Field {
        id,
        len,
        pen: PEN_REVERSE,
    }
}

const fn cage(id: u16, len: u16) -> Field {
    Field {
        id,
        len,
        pen: PEN_CAGE,
    }
}

/// The fields of the IPv4 (`v6` false) or IPv6 template, in the order of the record.
pub fn fields(v6: bool) -> [Field; 23] {
    let (addr, src, dst, icmp) = if v6 {
        (16, 27, 28, 139)
    } else {
        (4, 8, 12, 32)
    };
    [
        ie(152, 8),    // flowStartMilliseconds
        ie(153, 8),    // flowEndMilliseconds
        ie(src, addr), // sourceIPv4Address / sourceIPv6Address: the caged host
        ie(dst, addr), // destinationIPv4Address / destinationIPv6Address: the peer
        ie(7, 2),      // sourceTransportPort
        ie(11, 2),     // destinationTransportPort
        ie(icmp, 2),   // icmpTypeCodeIPv4 / icmpTypeCodeIPv6
        ie(4, 1),      // protocolIdentifier
        // tcpControlBits in one octet (reduced-size encoding, RFC 7011 §6.2): the flags
        // Cage counts are all in the low byte. The reverse flags come first: nfdump 1.7
        // reads a reverse element it has no reverse field for as the forward one, so
        // the forward flags, last, are what it keeps.
        rev(6, 1), // reverseTcpControlBits
        ie(6, 1),
        ie(1, 8),                          // octetDeltaCount: from the caged host
        ie(2, 8),                          // packetDeltaCount
        rev(1, 8),                         // reverseOctetDeltaCount: to the caged host
        rev(2, 8),                         // reversePacketDeltaCount
        ie(56, 6),                         // sourceMacAddress
        ie(239, 1),                        // biflowDirection: 1 initiator, 2 reverseInitiator
        ie(82, VARIABLE),                  // interfaceName: the segment's bridge port
        cage(cage_ie::VERDICT, 1),         // verdict
        cage(cage_ie::RULE, VARIABLE),     // rule
        cage(cage_ie::NAME, VARIABLE),     // resolved name
        cage(cage_ie::HOSTNAME, VARIABLE), // DHCP host name
        cage(cage_ie::TAG, VARIABLE),      // tag
        ie(136, 1),                        // flowEndReason
    ]
}

/// The template set with both templates: a set header, then each template record.
pub fn template_set() -> Vec<u8> {
    let mut set = vec![0u8; 4];
    put16(&mut set, 0, TEMPLATE_SET_ID);
    for (id, v6) in [(TEMPLATE_V4, false), (TEMPLATE_V6, true)] {
        let f = fields(v6);
        set.extend_from_slice(&id.to_be_bytes());
        set.extend_from_slice(&(f.len() as u16).to_be_bytes());
        for field in f {
            if field.pen == 0 {
                set.extend_from_slice(&field.id.to_be_bytes());
                set.extend_from_slice(&field.len.to_be_bytes());
            } else {
                set.extend_from_slice(&(field.id | 0x8000).to_be_bytes());
                set.extend_from_slice(&field.len.to_be_bytes());
                set.extend_from_slice(&field.pen.to_be_bytes());
            }
        }
    }
    let len = set.len() as u16;
    put16(&mut set, 2, len);
    set
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

/// A variable-length value (RFC 7011 §7): one length octet below 255, else 255 and
/// two octets of length.
pub fn put_variable(out: &mut Vec<u8>, value: &[u8]) {
    if value.len() < 255 {
        out.push(value.len() as u8);
    } else {
        out.push(255);
        out.extend_from_slice(&(value.len().min(0xffff) as u16).to_be_bytes());
    }
    out.extend_from_slice(&value[..value.len().min(0xffff)]);
}

/// `s` cut to at most [`MAX_TEXT`] bytes, at a character boundary (IPFIX strings are
/// UTF-8).
fn text(s: Option<&str>) -> &[u8] {
    let s = s.unwrap_or("");
    let mut end = s.len().min(MAX_TEXT);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s.as_bytes()[..end]
}

/// The IP protocol number of the flow log's `proto`.
pub fn protocol(proto: &str) -> u8 {
    match proto {
        "tcp" => 6,
        "udp" => 17,
        "icmp" => 1,
        "icmpv6" => 58,
        // The flow log's blocked ARP (nflog::PROTO_ARP): 255, reserved by IANA.
        "arp" => 255,
        n => n.parse().unwrap_or(255),
    }
}

/// The TCP flags of the flow log's text (`SAF/SA`): from the caged host, to it.
pub fn tcp_flags(text: Option<&str>) -> (u8, u8) {
    let bits = |s: &str| {
        s.chars().fold(0u8, |b, c| {
            b | match c {
                'F' => 0x01,
                'S' => 0x02,
                'R' => 0x04,
                'P' => 0x08,
                'A' => 0x10,
                'U' => 0x20,
                _ => 0,
            }
        })
    };
    match text.and_then(|t| t.split_once('/')) {
        Some((out, back)) => (bits(out), bits(back)),
        None => (0, 0),
    }
}

fn millis(rfc3339: &str) -> u64 {
    humantime::parse_rfc3339_weak(rfc3339)
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn mac(text: Option<&str>) -> [u8; 6] {
    let mut m = [0u8; 6];
    if let Some(t) = text {
        let parts: Vec<u8> = t
            .split(':')
            .filter_map(|p| u8::from_str_radix(p, 16).ok())
            .collect();
        if parts.len() == 6 {
            m.copy_from_slice(&parts);
        }
    }
    m
}

/// icmpTypeCode (type · 256 + code) from the flow log's `peer_port` of an ICMP flow:
/// the eBPF program's records have type · 256 + code there (above 255: no ICMP type
/// but echo has 0), the blocked ones from NFLOG the type alone, and an echo exchange,
/// which the program keys by its identifier, none: it goes out as the echo request.
pub fn icmp_type_code(proto: u8, peer_port: Option<u16>) -> u16 {
    match peer_port {
        Some(v) if v > 255 => v,
        Some(t) => t << 8,
        None if proto == 58 => 128 << 8,
        None => 8 << 8,
    }
}

/// A record's template and its bytes.
pub fn data_record(r: &FlowRecord) -> (u16, Vec<u8>) {
    let mut out = Vec::with_capacity(128);
    out.extend_from_slice(&millis(&r.start).to_be_bytes());
    out.extend_from_slice(&millis(&r.end).to_be_bytes());
    let template = match (r.host, r.peer) {
        (IpAddr::V4(h), IpAddr::V4(p)) => {
            out.extend_from_slice(&h.octets());
            out.extend_from_slice(&p.octets());
            TEMPLATE_V4
        }
        // Mixed families cannot happen in one flow; should one come, both go out as
        // IPv6 (the IPv4 one mapped) rather than being lost.
        (h, p) => {
            let v6 = |a: IpAddr| match a {
                IpAddr::V4(a) => a.to_ipv6_mapped(),
                IpAddr::V6(a) => a,
            };
            out.extend_from_slice(&v6(h).octets());
            out.extend_from_slice(&v6(p).octets());
            TEMPLATE_V6
        }
    };
    let proto = protocol(&r.proto);
    let icmp = proto == 1 || proto == 58;
    let (sport, dport, type_code) = if icmp {
        (0u16, 0u16, icmp_type_code(proto, r.peer_port))
    } else {
        (r.host_port.unwrap_or(0), r.peer_port.unwrap_or(0), 0)
    };
    out.extend_from_slice(&sport.to_be_bytes());
    out.extend_from_slice(&dport.to_be_bytes());
    out.extend_from_slice(&type_code.to_be_bytes());
    out.push(proto);
    let (flags_out, flags_in) = tcp_flags(r.tcp_flags.as_deref());
    out.push(flags_in);
    out.push(flags_out);
    out.extend_from_slice(&r.bytes_out.to_be_bytes());
    out.extend_from_slice(&r.packets_out.to_be_bytes());
    out.extend_from_slice(&r.bytes_in.to_be_bytes());
    out.extend_from_slice(&r.packets_in.to_be_bytes());
    out.extend_from_slice(&mac(r.mac.as_deref()));
    out.push(if r.direction == "in" { 2 } else { 1 });
    put_variable(&mut out, text(r.bridge_port.as_deref()));
    out.push(if r.verdict == "blocked" { 2 } else { 1 });
    put_variable(&mut out, text(r.rule.as_deref()));
    put_variable(&mut out, text(r.name.as_deref()));
    put_variable(&mut out, text(r.hostname.as_deref()));
    put_variable(&mut out, text(r.tag.as_deref()));
    // flowEndReason: a blocked flow was ended by the policy (0x04, forced end); an
    // allowed one by the idle or active timeout, which the record does not tell apart
    // (0x01, idle timeout, the common case).
    out.push(if r.verdict == "blocked" { 0x04 } else { 0x01 });
    (template, out)
}

/// The header of a message of `len` bytes.
pub fn header(len: usize, export_time: u32, sequence: u32, domain: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..2].copy_from_slice(&VERSION.to_be_bytes());
    h[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    h[4..8].copy_from_slice(&export_time.to_be_bytes());
    h[8..12].copy_from_slice(&sequence.to_be_bytes());
    h[12..16].copy_from_slice(&domain.to_be_bytes());
    h
}

/// One message ready to send and the data records in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub bytes: Vec<u8>,
    pub records: u32,
}

/// The stream of one exporter to one collector in one observation domain: the
/// sequence number is the count of data records in the stream's earlier messages
/// (RFC 7011 §3.1), modulo 2^32.
#[derive(Debug, Clone)]
pub struct Stream {
    pub domain: u32,
    pub sequence: u32,
}

impl Stream {
    pub fn new(domain: u32) -> Stream {
        Stream {
            domain,
            sequence: 0,
        }
    }

    /// A message with the template set alone.
    pub fn templates(&self, export_time: u32) -> Message {
        let set = template_set();
        let mut bytes = header(
            HEADER_LEN + set.len(),
            export_time,
            self.sequence,
            self.domain,
        )
        .to_vec();
        bytes.extend_from_slice(&set);
        Message { bytes, records: 0 }
    }

    /// The records in as few messages as fit: one data set for each run of records of
    /// one template, each set padded with zeros to a multiple of four octets (RFC 7011
    /// §3.3.1 allows it; it keeps the next set aligned). The sequence number advances
    /// by the records of every message made, sent or not, so a collector sees what
    /// did not arrive as a gap.
    pub fn data(&mut self, records: &[FlowRecord], export_time: u32) -> Vec<Message> {
        let mut messages = Vec::new();
        let mut bytes: Vec<u8> = Vec::new();
        let mut count = 0u32;
        // Where the open set's header is in `bytes`, and its template.
        let mut set: Option<(usize, u16)> = None;
        let close_set = |bytes: &mut Vec<u8>, set: &mut Option<(usize, u16)>| {
            if let Some((at, _)) = set.take() {
                while !(bytes.len() - at).is_multiple_of(4) {
                    bytes.push(0);
                }
                let len = (bytes.len() - at) as u16;
                put16(bytes, at + 2, len);
            }
        };
        for r in records {
            let (template, record) = data_record(r);
            let same_set = set.is_some_and(|(_, t)| t == template);
            // What the message grows by: the record, a new set's header, and at most 3
            // octets of padding when its set is closed.
            let grows = record.len() + if same_set { 0 } else { 4 } + 3;
            if !bytes.is_empty() && bytes.len() + grows > MAX_MESSAGE {
                close_set(&mut bytes, &mut set);
                messages.push(self.finish(std::mem::take(&mut bytes), count, export_time));
                count = 0;
            }
            if bytes.is_empty() {
                bytes.extend_from_slice(&[0u8; HEADER_LEN]);
            }
            if set.is_none_or(|(_, t)| t != template) {
                close_set(&mut bytes, &mut set);
                set = Some((bytes.len(), template));
                bytes.extend_from_slice(&template.to_be_bytes());
                bytes.extend_from_slice(&[0, 0]);
            }
            bytes.extend_from_slice(&record);
            count += 1;
        }
        if !bytes.is_empty() {
            close_set(&mut bytes, &mut set);
            messages.push(self.finish(bytes, count, export_time));
        }
        messages
    }

    fn finish(&mut self, mut bytes: Vec<u8>, records: u32, export_time: u32) -> Message {
        let h = header(bytes.len(), export_time, self.sequence, self.domain);
        bytes[..HEADER_LEN].copy_from_slice(&h);
        self.sequence = self.sequence.wrapping_add(records);
        Message { bytes, records }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(host: &str, peer: &str) -> FlowRecord {
        FlowRecord {
            start: "2027-01-15T08:00:00.123Z".into(),
            end: "2027-01-15T08:00:01.456Z".into(),
            verdict: "allowed".into(),
            rule: None,
            proto: "udp".into(),
            host: host.parse().unwrap(),
            host_port: Some(40000),
            mac: Some("02:ca:9e:00:00:11".into()),
            bridge_port: Some("cage1".into()),
            peer: peer.parse().unwrap(),
            peer_port: Some(53),
            direction: "out".into(),
            packets_out: 5,
            bytes_out: 640,
            packets_in: 4,
            bytes_in: 512,
            tag: None,
            tcp_flags: None,
            hostname: None,
            name: Some("example.com".into()),
        }
    }

    #[test]
    fn the_header_says_version_length_time_sequence_and_domain() {
        assert_eq!(
            header(0x0123, 0x6789abcd, 7, 0x01020304),
            [0, 10, 0x01, 0x23, 0x67, 0x89, 0xab, 0xcd, 0, 0, 0, 7, 1, 2, 3, 4]
        );
    }

    #[test]
    fn variable_length_uses_one_octet_below_255_and_three_from_255() {
        let mut v = Vec::new();
        put_variable(&mut v, b"");
        assert_eq!(v, [0]);
        let mut v = Vec::new();
        put_variable(&mut v, b"abc");
        assert_eq!(v, [3, b'a', b'b', b'c']);
        let mut v = Vec::new();
        put_variable(&mut v, &[7u8; 254]);
        assert_eq!(v.len(), 255);
        assert_eq!(v[0], 254);
        let mut v = Vec::new();
        put_variable(&mut v, &[7u8; 255]);
        assert_eq!(&v[..3], &[255, 0, 255]);
        assert_eq!(v.len(), 258);
        let mut v = Vec::new();
        put_variable(&mut v, &[7u8; 300]);
        assert_eq!(&v[..3], &[255, 0x01, 0x2c]);
        assert_eq!(v.len(), 303);
    }

    #[test]
    fn the_template_set_is_as_computed_by_hand() {
        let set = template_set();
        // Per template: 4 octets of header, 4 per IANA field, 8 per enterprise field
        // (3 reverse and 5 of Cage's among the 23).
        let one = 4 + 15 * 4 + 8 * 8;
        assert_eq!(one, 128);
        assert_eq!(set.len(), 4 + 2 * one);
        assert_eq!(&set[..4], &[0, 2, (set.len() >> 8) as u8, set.len() as u8]);
        // The IPv4 template: id 256, 23 fields, then flowStartMilliseconds (152, 8).
        assert_eq!(&set[4..12], &[1, 0, 0, 23, 0, 152, 0, 8]);
        // sourceIPv4Address is the third field (8, 4).
        assert_eq!(&set[16..20], &[0, 8, 0, 4]);
        // The ninth field, reverseTcpControlBits: bit 15 set, 1 octet, PEN 29305.
        let at = 4 + 4 + 8 * 4;
        assert_eq!(
            &set[at..at + 8],
            &[0x80, 6, 0, 1, 0, 0, 0x72, 0x79],
            "29305 = 0x7279"
        );
        // The verdict, Cage's element 1 under PEN 32473 (0x7ed9), one octet.
        let verdict = fields(false)
            .iter()
            .position(|f| f.pen == PEN_CAGE)
            .unwrap();
        let at = 4
            + 4
            + (0..verdict)
                .map(|i| if fields(false)[i].pen == 0 { 4 } else { 8 })
                .sum::<usize>();
        assert_eq!(&set[at..at + 8], &[0x80, 1, 0, 1, 0, 0, 0x7e, 0xd9]);
        // The IPv6 template follows, with sourceIPv6Address (27, 16).
        assert_eq!(&set[4 + one..4 + one + 4], &[1, 1, 0, 23]);
        assert_eq!(&set[4 + one + 12..4 + one + 16], &[0, 27, 0, 16]);
    }

    #[test]
    fn a_record_is_laid_out_as_its_template_says() {
        let (t, b) = data_record(&record("192.168.10.11", "203.0.113.10"));
        assert_eq!(t, TEMPLATE_V4);
        // 1 800 000 000 123 ms = 0x1a3185c507b.
        assert_eq!(&b[0..8], &1_800_000_000_123u64.to_be_bytes());
        assert_eq!(&b[8..16], &1_800_000_001_456u64.to_be_bytes());
        assert_eq!(&b[16..24], &[192, 168, 10, 11, 203, 0, 113, 10]);
        assert_eq!(
            &b[24..30],
            &[0x9c, 0x40, 0, 53, 0, 0],
            "ports, no ICMP type"
        );
        assert_eq!(&b[30..33], &[17, 0, 0], "UDP, no TCP flags");
        assert_eq!(&b[33..41], &640u64.to_be_bytes());
        assert_eq!(&b[41..49], &5u64.to_be_bytes());
        assert_eq!(&b[49..57], &512u64.to_be_bytes());
        assert_eq!(&b[57..65], &4u64.to_be_bytes());
        assert_eq!(&b[65..71], &[2, 0xca, 0x9e, 0, 0, 0x11]);
        assert_eq!(b[71], 1, "the caged host initiated");
        assert_eq!(&b[72..78], &[5, b'c', b'a', b'g', b'e', b'1']);
        assert_eq!(b[78], 1, "allowed");
        assert_eq!(b[79], 0, "no rule");
        assert_eq!(&b[80..92], b"\x0bexample.com");
        assert_eq!(
            &b[92..95],
            &[0, 0, 0x01],
            "no hostname, no tag, idle timeout"
        );
        assert_eq!(b.len(), 95);

        let mut blocked = record("fd00:cafe:10::11", "fd00:8::10");
        blocked.verdict = "blocked".into();
        blocked.rule = Some("deny:lan".into());
        blocked.proto = "icmpv6".into();
        blocked.peer_port = Some(128);
        blocked.tcp_flags = None;
        let (t, b) = data_record(&blocked);
        assert_eq!(t, TEMPLATE_V6);
        assert_eq!(
            &b[48..54],
            &[0, 0, 0, 0, 128, 0],
            "echo request as type and code"
        );
        assert_eq!(b[54], 58);
        let at = 16 + 32 + 6 + 3 + 32 + 6 + 1 + 6;
        assert_eq!(b[at], 2, "blocked");
        assert_eq!(&b[at + 1..at + 10], b"\x08deny:lan");

        let mut tcp = record("192.168.10.11", "203.0.113.10");
        tcp.proto = "tcp".into();
        tcp.tcp_flags = Some("SAPF/SAF".into());
        let (_, b) = data_record(&tcp);
        assert_eq!(&b[30..33], &[6, 0x13, 0x1b], "to the host, from it");
    }

    #[test]
    fn icmp_types_and_codes_as_the_flow_log_has_them() {
        // Neighbour solicitation as the eBPF program keys it (135 · 256).
        assert_eq!(icmp_type_code(58, Some(34560)), 0x8700);
        // Port unreachable (3, 3) from the program; echo request blocked (NFLOG's type).
        assert_eq!(icmp_type_code(1, Some(0x0303)), 0x0303);
        assert_eq!(icmp_type_code(1, Some(8)), 0x0800);
        // An echo exchange: the request's type.
        assert_eq!(icmp_type_code(1, None), 0x0800);
        assert_eq!(icmp_type_code(58, None), 0x8000);
    }

    #[test]
    fn long_texts_are_cut_at_a_character_boundary() {
        let mut r = record("192.168.10.11", "203.0.113.10");
        r.name = Some("é".repeat(200));
        let (_, b) = data_record(&r);
        let at = 80;
        assert_eq!(b[at] as usize, 252, "126 two-octet characters");
        assert!(std::str::from_utf8(&b[at + 1..at + 253]).is_ok());
    }

    #[test]
    fn messages_stay_under_the_mtu_with_padded_sets_and_counted_sequence() {
        let mut s = Stream::new(9);
        let mut records = Vec::new();
        for i in 0..40 {
            let mut r = if i % 3 == 0 {
                record("fd00:cafe:10::11", "2001:db8::1")
            } else {
                record("192.168.10.11", "203.0.113.10")
            };
            r.hostname = Some("h".repeat(i % 5));
            r.name = Some("n".repeat(253));
            records.push(r);
        }
        let messages = s.data(&records, 1_800_000_000);
        assert!(messages.len() > 1);
        let mut sequence = 0u32;
        let mut total = 0;
        for m in &messages {
            let b = &m.bytes;
            assert!(b.len() <= MAX_MESSAGE, "{}", b.len());
            assert_eq!(u16::from_be_bytes([b[2], b[3]]) as usize, b.len());
            assert_eq!(u32::from_be_bytes([b[8], b[9], b[10], b[11]]), sequence);
            assert_eq!(u32::from_be_bytes([b[12], b[13], b[14], b[15]]), 9);
            // Walk the sets: each a multiple of 4, ids of the two templates, ending
            // exactly at the message's end.
            let mut at = HEADER_LEN;
            while at < b.len() {
                let id = u16::from_be_bytes([b[at], b[at + 1]]);
                let len = u16::from_be_bytes([b[at + 2], b[at + 3]]) as usize;
                assert!(id == TEMPLATE_V4 || id == TEMPLATE_V6);
                assert_eq!(len % 4, 0);
                at += len;
            }
            assert_eq!(at, b.len());
            sequence += m.records;
            total += m.records;
        }
        assert_eq!(total, 40);
        assert_eq!(s.sequence, 40);
        // A template message carries the sequence number without advancing it.
        let t = s.templates(1);
        assert_eq!(&t.bytes[8..12], &40u32.to_be_bytes());
        assert_eq!(t.bytes.len(), HEADER_LEN + template_set().len());
        assert_eq!(s.sequence, 40);
    }

    #[test]
    fn one_short_record_makes_a_padded_set() {
        let mut s = Stream::new(1);
        let m = s.data(&[record("192.168.10.11", "203.0.113.10")], 0);
        assert_eq!(m.len(), 1);
        // 16 header + 4 set header + 95 record + 1 padding = 116.
        assert_eq!(m[0].bytes.len(), 116);
        assert_eq!(&m[0].bytes[16..20], &[1, 0, 0, 100]);
        assert_eq!(m[0].bytes[115], 0);
    }
}
