//! The pieces rules are built from: expressions and statements of the `nftables` crate,
//! a chain being filled ([`ChainRules`], with the deny and reject patterns every deny
//! rule follows), tables, chains and address sets.

use std::borrow::Cow;

use ipnet::IpNet;
use nftables::expr::{
    Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, Prefix, SetItem, CT,
};
use nftables::schema::{self, NfListObject};
use nftables::stmt::{self, Counter, Match, Operator, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook, RejectCode};

use super::*;

// ---- expression helpers -------------------------------------------------------------

pub(super) fn s(v: impl Into<String>) -> Expression<'static> {
    Expression::String(Cow::Owned(v.into()))
}

pub(super) fn payload(protocol: &'static str, field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: protocol.into(),
            field: field.into(),
        },
    )))
}

pub(super) fn meta(key: MetaKey) -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta { key }))
}

pub(super) fn ct(key: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::CT(CT {
        key: key.into(),
        family: None,
        dir: None,
    }))
}

pub(super) fn net(n: IpNet) -> Expression<'static> {
    if n.prefix_len() == n.max_prefix_len() {
        return s(n.addr().to_string());
    }
    Expression::Named(NamedExpression::Prefix(Prefix {
        addr: Box::new(s(n.network().to_string())),
        len: n.prefix_len() as u32,
    }))
}

pub(super) fn anon_set(items: Vec<Expression<'static>>) -> Expression<'static> {
    if items.len() == 1 {
        return items.into_iter().next().unwrap();
    }
    Expression::Named(NamedExpression::Set(
        items.into_iter().map(SetItem::Element).collect(),
    ))
}

pub(super) fn names(devs: &[String]) -> Expression<'static> {
    anon_set(devs.iter().map(|d| s(d.clone())).collect())
}

pub(super) fn is(left: Expression<'static>, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match {
        left,
        right,
        op: Operator::EQ,
    })
}

pub(super) fn is_not(left: Expression<'static>, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match {
        left,
        right,
        op: Operator::NEQ,
    })
}

pub(super) fn iifname(devs: &[String]) -> Statement<'static> {
    is(meta(MetaKey::Iifname), names(devs))
}

pub(super) fn oifname(devs: &[String]) -> Statement<'static> {
    is(meta(MetaKey::Oifname), names(devs))
}

pub(super) fn l4proto(p: &'static str) -> Statement<'static> {
    is(meta(MetaKey::L4proto), s(p))
}

pub(super) fn dport(proto: &'static str, port: u16) -> Statement<'static> {
    is(payload(proto, "dport"), Expression::Number(port as u32))
}

pub(super) fn counter() -> Statement<'static> {
    Statement::Counter(Counter::Anonymous(None))
}

pub(super) fn accept() -> Statement<'static> {
    Statement::Accept(None)
}

pub(super) fn drop() -> Statement<'static> {
    Statement::Drop(None)
}

pub(super) fn jump(chain: &str) -> Statement<'static> {
    Statement::Jump(stmt::JumpTarget {
        target: chain.to_owned().into(),
    })
}

pub(super) fn goto(chain: &str) -> Statement<'static> {
    Statement::Goto(stmt::JumpTarget {
        target: chain.to_owned().into(),
    })
}

pub(super) fn set_ref(name: &str) -> Expression<'static> {
    s(format!("@{name}"))
}

pub(super) fn log(prefix: &str) -> Statement<'static> {
    Statement::Log(Some(stmt::Log {
        prefix: Some(prefix.to_owned().into()),
        group: Some(u32::from(LOG_GROUP)),
        snaplen: Some(LOG_SNAPLEN),
        queue_threshold: None,
        level: None,
        flags: None,
    }))
}

/// The `unlogged` counter of a table: denied packets over the log's rate limit. Each of
/// Cage's tables has its own (a rule can only name a counter of its table).
pub(super) fn unlogged_counter(family: NfFamily) -> NfListObject<'static> {
    NfListObject::Counter(schema::Counter {
        family,
        table: TABLE.into(),
        name: UNLOGGED_COUNTER.into(),
        handle: None,
        packets: None,
        bytes: None,
    })
}

pub(super) fn unlogged() -> Statement<'static> {
    Statement::Counter(Counter::Named(UNLOGGED_COUNTER.into()))
}

pub(super) fn limit() -> Statement<'static> {
    Statement::Limit(stmt::Limit {
        rate: REJECT_RATE_PER_SECOND,
        rate_unit: None,
        per: Some("second".into()),
        burst: Some(REJECT_RATE_PER_SECOND),
        burst_unit: None,
        inv: None,
    })
}

// ---- the ruleset ----------------------------------------------------------------------

/// A chain being filled: rules are appended in order, each with its comment.
pub(super) struct ChainRules {
    family: NfFamily,
    name: &'static str,
    rules: Vec<(Vec<Statement<'static>>, String)>,
    /// Count each rejected attempt per source host (automatic isolation).
    count_blocked: bool,
}

impl ChainRules {
    pub(super) fn new(family: NfFamily, name: &'static str) -> Self {
        ChainRules {
            family,
            name,
            rules: Vec::new(),
            count_blocked: false,
        }
    }

    pub(super) fn counting_blocked(mut self, on: bool) -> Self {
        self.count_blocked = on;
        self
    }

    pub(super) fn rule(&mut self, comment: &str, stmts: Vec<Statement<'static>>) {
        self.rules.push((stmts, comment.to_owned()));
    }

    /// Deny by dropping, counted, logged to NFLOG while under the rate limit, counted
    /// as unlogged beyond it: `matches` select the packets, `comment` names the deny.
    pub(super) fn deny(&mut self, comment: &str, matches: Vec<Statement<'static>>) {
        let mut logged = matches.clone();
        logged.extend([limit(), counter(), log(comment), drop()]);
        self.rule(comment, logged);
        let mut over = matches;
        over.extend([counter(), unlogged(), drop()]);
        self.rule(comment, over);
    }

    /// Deny with a fast answer (TCP reset, ICMP administratively prohibited), counted,
    /// logged and rate-limited (dropped and counted as unlogged beyond the rate), and
    /// counted per host for automatic isolation when the chain counts blocked attempts.
    pub(super) fn reject(&mut self, comment: &str, matches: Vec<Statement<'static>>) {
        if self.count_blocked {
            let mut count = matches.clone();
            count.push(jump(COUNT_BLOCKED_CHAIN));
            self.rule(comment, count);
        }
        let mut tcp = matches.clone();
        tcp.extend([
            l4proto("tcp"),
            limit(),
            counter(),
            log(comment),
            Statement::Reject(Some(stmt::Reject::new(
                Some(stmt::RejectType::TCPReset),
                None,
            ))),
        ]);
        self.rule(comment, tcp);
        let mut other = matches.clone();
        other.extend([
            limit(),
            counter(),
            log(comment),
            Statement::Reject(Some(stmt::Reject::new(
                Some(stmt::RejectType::ICMPX),
                Some(RejectCode::AdminProhibited),
            ))),
        ]);
        self.rule(comment, other);
        let mut over = matches;
        over.extend([counter(), unlogged(), drop()]);
        self.rule(comment, over);
    }

    pub(super) fn into_objects(self, table: &str) -> Vec<NfListObject<'static>> {
        let (family, chain) = (self.family, self.name);
        self.rules
            .into_iter()
            .map(|(expr, comment)| {
                NfListObject::Rule(schema::Rule {
                    family,
                    table: table.to_owned().into(),
                    chain: chain.into(),
                    expr: expr.into(),
                    handle: None,
                    index: None,
                    comment: Some(comment.into()),
                })
            })
            .collect()
    }
}

pub(super) fn table(family: NfFamily) -> NfListObject<'static> {
    NfListObject::Table(schema::Table {
        family,
        name: TABLE.into(),
        handle: None,
    })
}

pub(super) fn base_chain(
    family: NfFamily,
    name: &'static str,
    kind: NfChainType,
    hook: NfHook,
    prio: i32,
) -> NfListObject<'static> {
    NfListObject::Chain(schema::Chain {
        family,
        table: TABLE.into(),
        name: name.into(),
        _type: Some(kind),
        hook: Some(hook),
        prio: Some(prio),
        policy: Some(NfChainPolicy::Accept),
        ..Default::default()
    })
}

pub(super) fn regular_chain(family: NfFamily, name: &'static str) -> NfListObject<'static> {
    NfListObject::Chain(schema::Chain {
        family,
        table: TABLE.into(),
        name: name.into(),
        ..Default::default()
    })
}

/// The type of a set of IPv6 or IPv4 addresses.
pub(super) fn addr_type(v6: bool) -> schema::SetTypeValue<'static> {
    schema::SetTypeValue::Single(if v6 {
        schema::SetType::Ipv6Addr
    } else {
        schema::SetType::Ipv4Addr
    })
}

pub(super) fn addr_set(
    name: &'static str,
    v6: bool,
    elems: Vec<IpNet>,
    comment: &'static str,
) -> NfListObject<'static> {
    let interval = elems.iter().any(|n| n.prefix_len() != n.max_prefix_len());
    NfListObject::Set(Box::new(schema::Set {
        family: NfFamily::INet,
        table: TABLE.into(),
        name: name.into(),
        set_type: addr_type(v6),
        flags: interval.then(|| [schema::SetFlag::Interval].into_iter().collect()),
        elem: (!elems.is_empty())
            .then(|| Cow::Owned(elems.into_iter().map(net).collect::<Vec<_>>())),
        comment: Some(comment.into()),
        ..Default::default()
    }))
}
