//! The probes judge right: a packet dropped at the destination's input hook is "blocked"
//! (the witness sits after that hook), a packet whose answer is dropped on the way back
//! has "leaked", an answer from somewhere the witness did not see is "inconsistent", and
//! a reject is seen as blocked at once. Checked in the lab without Cage, with nftables
//! rules of the test's own in the router's namespace.

use std::time::Duration;

use cage_agent::probe::{Outcome, Probe, Verdict};
use cage_tests::contract::probe_once;
use cage_tests::lab::{self, Lab, Node, ROUTER_LAN4, ROUTER_LAN6};
use cage_tests::require_root;

#[test]
#[ignore = "needs root: cargo xtask test"]
fn verdicts_follow_what_the_witness_sees() {
    require_root();
    let lab = Lab::up(&lab::unique_prefix()).expect("lab up");
    lab.nft(
        Node::Router,
        "table inet probetest {
            chain input {
                type filter hook input priority 0; policy accept;
                tcp dport 22 drop
                udp dport 161 drop
                icmp type echo-request drop
                icmpv6 type echo-request drop
                tcp dport 443 reject with tcp reset
                udp dport 547 reject
            }
            chain output {
                type filter hook output priority 0; policy accept;
                tcp sport 80 drop
                udp sport 53 drop
            }
            chain prerouting {
                type nat hook prerouting priority dstnat; policy accept;
                tcp dport 8080 redirect to :53
            }
        }",
    );
    let case = |probe: Probe, want: Verdict| {
        let o = probe_once(&lab, Node::Lan, &probe).unwrap_or_else(|e| panic!("{probe}: {e}"));
        let took = o.attempt.finished - o.attempt.started;
        println!("{probe}: {} in {took:?}", o.summary());
        assert_eq!(o.verdict, want, "{probe}: {}", o.summary());
        o
    };
    for dst in [ROUTER_LAN4, ROUTER_LAN6] {
        // Dropped at the input hook: the witness sees nothing.
        case(Probe::tcp(dst, 22), Verdict::Blocked);
        case(Probe::udp(dst, 161), Verdict::Blocked);
        case(Probe::icmp(dst), Verdict::Blocked);
        // Rejected: blocked, and the prober knows at once.
        for p in [Probe::tcp(dst, 443), Probe::udp(dst, 547)] {
            let o = case(p, Verdict::Blocked);
            assert!(
                matches!(o.attempt.outcome, Outcome::Refused(_)),
                "{}",
                o.summary()
            );
            assert!(o.attempt.finished - o.attempt.started < Duration::from_millis(500));
        }
        // The answer is dropped: the packet arrived, the deny would have leaked.
        case(Probe::tcp(dst, 80), Verdict::Leaked);
        case(Probe::udp(dst, 53), Verdict::Leaked);
        // Redirected to another port: answered, but not by what the probe addressed.
        case(Probe::tcp(dst, 8080), Verdict::Inconsistent);
        // Untouched: delivered.
        case(Probe::udp(dst, 67), Verdict::Delivered);
        case(Probe::tcp(dst, 53), Verdict::Delivered);
    }
}
