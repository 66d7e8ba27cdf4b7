//! A rendered ruleset in nft's two notations: the JSON that `nft -j -f -` reads
//! ([`to_json`]), and nft's own text syntax ([`to_text`]) for `cage check` and the golden
//! files. Running nft is `cage_agent::nft`'s.

use std::fmt::Write as _;

use nftables::expr::{Expression, MetaKey, NamedExpression, Payload, SetItem};
use nftables::schema::{NfCmd, NfListObject, NfObject, Nftables, SetTypeValue};
use nftables::stmt::{Counter, Operator, RejectType, Statement};
use nftables::types::{NfChainType, NfFamily, NfHook};

use crate::policy::TABLE;

/// The JSON that `nft -j -f -` reads for a ruleset: what `cage_agent::nft` feeds to nft,
/// and what `cage check --json` prints.
pub fn to_json(rs: &Nftables) -> String {
    let mut v = serde_json::to_value(rs).expect("an nftables ruleset always serialises");
    fix_meta_keys(&mut v);
    v.to_string()
}

/// The `nftables` crate (0.6) names the bridge meta keys `ibridgename`/`obridgename`,
/// which nft's JSON parser (1.0.x) rejects: it knows them as `ibrname`/`obrname`. Rename
/// them in the serialised JSON until the crate does.
fn fix_meta_keys(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(map) => {
            if let Some(serde_json::Value::Object(meta)) = map.get_mut("meta") {
                if let Some(serde_json::Value::String(key)) = meta.get_mut("key") {
                    match key.as_str() {
                        "ibridgename" => *key = "ibrname".into(),
                        "obridgename" => *key = "obrname".into(),
                        _ => {}
                    }
                }
            }
            map.values_mut().for_each(fix_meta_keys);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(fix_meta_keys),
        _ => {}
    }
}

/// Print a rendered ruleset (the output of `policy::render`) in nft's text syntax, for
/// `cage check` and the golden files. The tables as they will be after the transaction
/// are printed; the add/delete dance that makes the replacement atomic is not.
pub fn to_text(rs: &Nftables) -> String {
    struct Tbl {
        family: NfFamily,
        sets: Vec<String>,
        chains: Vec<(String, Option<String>, Vec<String>)>,
    }
    let mut tables: Vec<Tbl> = Vec::new();
    let tbl = |tables: &mut Vec<Tbl>, family: NfFamily| -> usize {
        if let Some(i) = tables.iter().position(|t| t.family == family) {
            return i;
        }
        tables.push(Tbl {
            family,
            sets: vec![],
            chains: vec![],
        });
        tables.len() - 1
    };
    for obj in rs.objects.iter() {
        let (deleting, o) = match obj {
            NfObject::CmdObject(NfCmd::Add(o)) => (false, o),
            NfObject::CmdObject(NfCmd::Delete(o)) => (true, o),
            NfObject::ListObject(o) => (false, o),
            other => {
                let t = tbl(&mut tables, NfFamily::INet);
                tables[t].sets.push(format!("# unprintable: {other:?}"));
                continue;
            }
        };
        match o {
            NfListObject::Table(t) => {
                let i = tbl(&mut tables, t.family);
                if deleting {
                    tables[i].sets.clear();
                    tables[i].chains.clear();
                }
            }
            NfListObject::Set(set) => {
                let i = tbl(&mut tables, set.family);
                let mut b = format!("\tset {} {{\n", set.name);
                let name = |t: &nftables::schema::SetType| {
                    serde_json::to_value(t)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_else(|| "?".into())
                };
                let types: Vec<String> = match &set.set_type {
                    SetTypeValue::Single(t) => vec![name(t)],
                    SetTypeValue::Concatenated(t) => t.iter().map(name).collect(),
                };
                let _ = writeln!(b, "\t\ttype {}", types.join(" . "));
                let quote = types.iter().any(|t| t == "ifname");
                if let Some(size) = set.size {
                    let _ = writeln!(b, "\t\tsize {size}");
                }
                if let Some(flags) = &set.flags {
                    let mut f: Vec<String> = flags
                        .iter()
                        .map(|f| {
                            serde_json::to_value(f)
                                .unwrap()
                                .as_str()
                                .unwrap()
                                .to_owned()
                        })
                        .collect();
                    f.sort();
                    let _ = writeln!(b, "\t\tflags {}", f.join(","));
                }
                if let Some(t) = set.timeout {
                    let _ = writeln!(b, "\t\ttimeout {t}s");
                }
                if let Some(c) = &set.comment {
                    let _ = writeln!(b, "\t\tcomment \"{c}\"");
                }
                if let Some(elems) = &set.elem {
                    let e: Vec<String> = elems.iter().map(|e| expr(e, quote)).collect();
                    let _ = writeln!(b, "\t\telements = {{ {} }}", e.join(", "));
                }
                b.push_str("\t}\n");
                tables[i].sets.push(b);
            }
            NfListObject::Chain(c) => {
                let i = tbl(&mut tables, c.family);
                let head = c.hook.map(|h| {
                    let ty = match c._type {
                        Some(NfChainType::NAT) => "nat",
                        Some(NfChainType::Route) => "route",
                        _ => "filter",
                    };
                    let hook = match h {
                        NfHook::Ingress => "ingress",
                        NfHook::Prerouting => "prerouting",
                        NfHook::Forward => "forward",
                        NfHook::Input => "input",
                        NfHook::Output => "output",
                        NfHook::Postrouting => "postrouting",
                        NfHook::Egress => "egress",
                    };
                    format!(
                        "type {ty} hook {hook} priority {}; policy accept;",
                        c.prio.unwrap_or(0)
                    )
                });
                tables[i].chains.push((c.name.to_string(), head, vec![]));
            }
            NfListObject::Rule(r) => {
                let i = tbl(&mut tables, r.family);
                let mut line: Vec<String> = r.expr.iter().map(statement).collect();
                if let Some(c) = &r.comment {
                    line.push(format!("comment \"{c}\""));
                }
                match tables[i].chains.iter_mut().find(|c| c.0 == r.chain) {
                    Some(chain) => chain.2.push(line.join(" ")),
                    None => tables[i]
                        .sets
                        .push(format!("# rule for unknown chain {}", r.chain)),
                }
            }
            NfListObject::Counter(c) => {
                let i = tbl(&mut tables, c.family);
                tables[i]
                    .sets
                    .push(format!("\tcounter {} {{\n\t}}\n", c.name));
            }
            NfListObject::Element(el) if !deleting => {
                let i = tbl(&mut tables, el.family);
                let head = format!("\tset {} {{\n", el.name);
                match tables[i].sets.iter_mut().find(|b| b.starts_with(&head)) {
                    Some(block) => {
                        let quote = block.contains("type ifname");
                        let e: Vec<String> = el.elem.iter().map(|e| expr(e, quote)).collect();
                        let end = block.len() - "\t}\n".len();
                        block.insert_str(end, &format!("\t\telements = {{ {} }}\n", e.join(", ")));
                    }
                    None => tables[i]
                        .sets
                        .push(format!("# elements for unknown set {}\n", el.name)),
                }
            }
            other => {
                let i = tbl(&mut tables, NfFamily::INet);
                tables[i].sets.push(format!("# unprintable: {other:?}\n"));
            }
        }
    }
    let mut out = String::new();
    for t in tables {
        let fam = match t.family {
            NfFamily::IP => "ip",
            NfFamily::IP6 => "ip6",
            NfFamily::INet => "inet",
            NfFamily::ARP => "arp",
            NfFamily::Bridge => "bridge",
            NfFamily::NetDev => "netdev",
        };
        let _ = writeln!(out, "table {fam} {TABLE} {{");
        let mut blocks: Vec<String> = t.sets;
        for (name, head, rules) in t.chains {
            let mut b = format!("\tchain {name} {{\n");
            if let Some(h) = head {
                let _ = writeln!(b, "\t\t{h}");
            }
            for r in rules {
                let _ = writeln!(b, "\t\t{r}");
            }
            b.push_str("\t}\n");
            blocks.push(b);
        }
        out.push_str(&blocks.join("\n"));
        out.push_str("}\n");
    }
    out
}

fn statement(st: &Statement) -> String {
    match st {
        Statement::Match(m) => {
            let quote = matches!(
                &m.left,
                Expression::Named(NamedExpression::Meta(meta))
                    if matches!(meta.key, MetaKey::Iifname | MetaKey::Oifname | MetaKey::Ibridgename | MetaKey::Obridgename)
            );
            let l = expr(&m.left, false);
            let r = expr(&m.right, quote);
            match m.op {
                Operator::EQ => format!("{l} {r}"),
                Operator::NEQ => format!("{l} != {r}"),
                op => format!(
                    "{l} {} {r}",
                    serde_json::to_value(op).unwrap().as_str().unwrap_or("?")
                ),
            }
        }
        Statement::Counter(Counter::Anonymous(_)) => "counter".into(),
        Statement::Counter(Counter::Named(n)) => format!("counter name {n}"),
        Statement::Accept(_) => "accept".into(),
        Statement::Drop(_) => "drop".into(),
        Statement::Return(_) => "return".into(),
        Statement::Continue(_) => "continue".into(),
        Statement::Jump(j) => format!("jump {}", j.target),
        Statement::Goto(j) => format!("goto {}", j.target),
        Statement::Masquerade(None) => "masquerade".into(),
        Statement::DNAT(Some(nftables::stmt::NAT {
            addr: Some(Expression::String(addr)),
            family,
            port: Some(Expression::Number(port)),
            flags: None,
        })) => match family {
            Some(nftables::stmt::NATFamily::IP6) => format!("dnat ip6 to [{addr}]:{port}"),
            _ => format!("dnat ip to {addr}:{port}"),
        },
        Statement::Log(Some(l)) => {
            let mut t = "log".to_owned();
            if let Some(p) = &l.prefix {
                let _ = write!(t, " prefix \"{p}\"");
            }
            if let Some(g) = l.group {
                let _ = write!(t, " group {g}");
            }
            if let Some(s) = l.snaplen {
                let _ = write!(t, " snaplen {s}");
            }
            t
        }
        Statement::Set(set) => format!(
            "{} {} {{ {} }}",
            match set.op {
                nftables::stmt::SetOp::Add => "add",
                nftables::stmt::SetOp::Update => "update",
            },
            set.set,
            expr(&set.elem, false)
        ),
        Statement::CTCount(c) => format!(
            "ct count {}{}",
            if c.inv == Some(true) { "over " } else { "" },
            expr(&c.val, false)
        ),
        Statement::Meter(m) => format!(
            "meter {} {{ {} {} }}",
            m.name,
            expr(&m.key, false),
            statement(&m.stmt)
        ),
        Statement::Limit(l) => {
            let mut t = format!(
                "limit rate {}{}/{}",
                if l.inv == Some(true) { "over " } else { "" },
                l.rate,
                l.per.as_deref().unwrap_or("second")
            );
            if let Some(b) = l.burst {
                let _ = write!(t, " burst {b} packets");
            }
            t
        }
        Statement::Reject(Some(r)) => match (r._type, &r.expr) {
            (Some(RejectType::TCPReset), _) => "reject with tcp reset".into(),
            (Some(ty), Some(code)) => format!(
                "reject with {} {}",
                serde_json::to_value(ty).unwrap().as_str().unwrap_or("?"),
                serde_json::to_value(code).unwrap().as_str().unwrap_or("?")
            ),
            _ => "reject".into(),
        },
        Statement::Reject(None) => "reject".into(),
        other => format!(
            "/* {} */",
            serde_json::to_string(other).unwrap_or_else(|_| "?".into())
        ),
    }
}

fn expr(e: &Expression, quote: bool) -> String {
    match e {
        // `@name` is a set reference, never a quoted name.
        Expression::String(s) if quote && !s.starts_with('@') => format!("\"{s}\""),
        Expression::String(s) => s.to_string(),
        Expression::Number(n) => n.to_string(),
        Expression::Boolean(b) => b.to_string(),
        Expression::List(l) => l
            .iter()
            .map(|e| expr(e, quote))
            .collect::<Vec<_>>()
            .join(", "),
        Expression::Named(n) => match n {
            NamedExpression::Payload(Payload::PayloadField(p)) => {
                format!("{} {}", p.protocol, p.field)
            }
            NamedExpression::Meta(m) => {
                let key = serde_json::to_value(m.key).unwrap();
                let key = key.as_str().unwrap_or("?");
                // nft prints these keys without the `meta` keyword.
                if matches!(
                    m.key,
                    MetaKey::Iifname | MetaKey::Oifname | MetaKey::Iif | MetaKey::Oif
                ) {
                    key.to_owned()
                } else if m.key == MetaKey::Ibridgename {
                    "meta ibrname".to_owned()
                } else if m.key == MetaKey::Obridgename {
                    "meta obrname".to_owned()
                } else {
                    format!("meta {key}")
                }
            }
            NamedExpression::CT(c) => format!("ct {}", c.key),
            NamedExpression::Numgen(n) => format!(
                "numgen {} mod {}",
                match n.mode {
                    nftables::expr::NgMode::Inc => "inc",
                    nftables::expr::NgMode::Random => "random",
                },
                n.ng_mod
            ),
            NamedExpression::Concat(parts) => parts
                .iter()
                .map(|p| expr(p, quote))
                .collect::<Vec<_>>()
                .join(" . "),
            NamedExpression::Elem(el) => match el.timeout {
                Some(t) => format!("{} timeout {t}s", expr(&el.val, quote)),
                None => expr(&el.val, quote),
            },
            NamedExpression::Prefix(p) => format!("{}/{}", expr(&p.addr, false), p.len),
            NamedExpression::Set(items) => {
                let inner: Vec<String> = items
                    .iter()
                    .map(|i| match i {
                        SetItem::Element(e) => expr(e, quote),
                        other => format!("/* {other:?} */"),
                    })
                    .collect();
                format!("{{ {} }}", inner.join(", "))
            }
            other => format!(
                "/* {} */",
                serde_json::to_string(other).unwrap_or_else(|_| "?".into())
            ),
        },
        other => format!(
            "/* {} */",
            serde_json::to_string(other).unwrap_or_else(|_| "?".into())
        ),
    }
}

/// `text` (nft's listing, with or without `-s`) without the `elements = { … }` of sets
/// and meters the kernel fills from traffic on its own (flags `dynamic` or `timeout`: the
/// layer-2 bindings, the meters) or whose elements expire: state like counters rather
/// than policy. The sets Cage writes (deny lists, admin hosts, the kill switch) stay. For
/// comparing a ruleset before and after something that must not change it.
pub fn without_learned_elements(text: &str) -> String {
    let mut out = Vec::new();
    let (mut skipping, mut learned) = (false, false);
    for line in text.lines() {
        if skipping {
            if line.trim_end().ends_with('}') {
                skipping = false;
            }
            continue;
        }
        let t = line.trim_start();
        if t.starts_with("set ") || t.starts_with("meter ") {
            learned = false;
        } else if t.starts_with("flags ") && (t.contains("dynamic") || t.contains("timeout")) {
            learned = true;
        } else if t.starts_with("elements = {") && (learned || line.contains("expires")) {
            skipping = !line.trim_end().ends_with('}');
            continue;
        }
        out.push(line);
    }
    if out.is_empty() {
        return String::new();
    }
    out.join("\n") + "\n"
}

#[cfg(test)]
mod tests {
    use super::without_learned_elements;

    #[test]
    fn learned_elements_go_and_written_ones_stay() {
        let listing = "table bridge cage {\n\tset own4 {\n\t\ttype ipv4_addr\n\t\tsize 4096\n\
            \t\tflags dynamic,timeout\n\t\ttimeout 1h\n\t\telements = { 192.168.10.11,\n\
            \t\t\t     192.168.10.12 }\n\t}\n\n\tset admin4 {\n\t\ttype ipv4_addr\n\
            \t\telements = { 192.168.8.20 }\n\t}\n\n\tset seen {\n\t\ttype ipv4_addr\n\
            \t\telements = { 10.0.0.1 expires 5s }\n\t}\n}\n";
        let kept = without_learned_elements(listing);
        assert!(!kept.contains("192.168.10.1"), "{kept}");
        assert!(!kept.contains("10.0.0.1"), "{kept}");
        assert!(kept.contains("elements = { 192.168.8.20 }"), "{kept}");
        assert!(kept.contains("flags dynamic,timeout"), "{kept}");
    }
}
