//! A stand-in for OpenWrt's `jsonfilter`, which `../shared/openwrt` does not have (it is
//! a package of its own, `jsonpath`): the lab's OpenWrt root needs it for
//! `/lib/functions/network.sh` (every `network_get_*`), which dnsmasq's init script calls
//! to learn each DHCP interface's device and subnet, and for `devstatus … | jsonfilter
//! -e @.up`.
//!
//! It does what the tool's usage text documents, for the expressions OpenWrt's scripts
//! use: a path from `@` or `$`, members (`.name`, `['name']`), indices (`[0]`, `[-1]`),
//! `[*]`, unions (`['address','mask']`), and filters (`[@.interface='lan']`,
//! `[@.target='::' && !@.table]`, a path as a test of existence, `!`, `&&`, `||`,
//! `=`, `!=`, `<`, `<=`, `>`, `>=`). `-e PATH` prints each match on a line (strings as
//! they are, anything else as JSON); `-e VAR=PATH` prints `export VAR='…'; ` for the
//! shell to eval, the values joined by the `-F` separators in turn (strings quoted,
//! booleans 1/0, an object's keys, an array's indices); `-t` prints types; `-l` limits
//! the matches, `-q` silences errors; the exit code is 1 when an expression matched
//! nothing. Written from that description, for the lab only: it is never shipped.

use serde_json::Value;

/// One selector of a path.
#[derive(Debug, Clone, PartialEq)]
enum Selector {
    Key(String),
    Index(i64),
    Wildcard,
    Union(Vec<Selector>),
    Filter(Expr),
}

/// A path: from the document's root (`$`) or the current node (`@`).
#[derive(Debug, Clone, PartialEq)]
struct Path {
    relative: bool,
    steps: Vec<Selector>,
}

#[derive(Debug, Clone, PartialEq)]
enum Expr {
    Path(Path),
    Literal(Value),
    Not(Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    Cmp(Box<Expr>, Cmp, Box<Expr>),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

/// A parsed `-e` / `-t` argument: an optional shell variable and the path.
#[derive(Debug, Clone, PartialEq)]
pub struct Pattern {
    var: Option<String>,
    path: Path,
}

impl Pattern {
    /// Parse `PATH` or `VAR=PATH`; the error says where it stopped.
    pub fn parse(text: &str) -> Result<Pattern, String> {
        let mut p = Parser {
            s: text.as_bytes(),
            i: 0,
        };
        p.skip_ws();
        let var = {
            let start = p.i;
            while p.i < p.s.len() && (p.s[p.i].is_ascii_alphanumeric() || p.s[p.i] == b'_') {
                p.i += 1;
            }
            if p.i > start && p.peek() == Some(b'=') {
                let v = text[start..p.i].to_owned();
                p.i += 1;
                Some(v)
            } else {
                p.i = start;
                None
            }
        };
        let path = p.path()?;
        p.skip_ws();
        if p.i != p.s.len() {
            return Err(p.error("the end of the expression"));
        }
        Ok(Pattern { var, path })
    }

    /// The shell variable of `VAR=PATH`.
    pub fn var(&self) -> Option<&str> {
        self.var.as_deref()
    }

    /// The nodes the path selects in `doc`, in document order of the selectors.
    pub fn matches<'a>(&self, doc: &'a Value) -> Vec<&'a Value> {
        select(&self.path, doc, doc)
    }
}

fn select<'a>(path: &Path, root: &'a Value, current: &'a Value) -> Vec<&'a Value> {
    let mut nodes = vec![if path.relative { current } else { root }];
    for step in &path.steps {
        let mut next = Vec::new();
        for node in nodes {
            apply(step, root, node, &mut next);
        }
        nodes = next;
    }
    nodes
}

fn apply<'a>(step: &Selector, root: &'a Value, node: &'a Value, out: &mut Vec<&'a Value>) {
    match step {
        Selector::Key(k) => out.extend(node.get(k.as_str())),
        Selector::Index(i) => {
            if let Value::Array(a) = node {
                let at = if *i < 0 { a.len() as i64 + i } else { *i };
                out.extend(usize::try_from(at).ok().and_then(|at| a.get(at)));
            }
        }
        Selector::Wildcard => match node {
            Value::Array(a) => out.extend(a.iter()),
            Value::Object(o) => out.extend(o.values()),
            _ => {}
        },
        Selector::Union(all) => {
            for s in all {
                apply(s, root, node, out);
            }
        }
        Selector::Filter(e) => {
            let children: Vec<&Value> = match node {
                Value::Array(a) => a.iter().collect(),
                Value::Object(o) => o.values().collect(),
                _ => Vec::new(),
            };
            out.extend(children.into_iter().filter(|c| truthy(e, root, c)));
        }
    }
}

/// An operand's value: a literal, or the first node a path selects.
fn operand<'a>(e: &'a Expr, root: &'a Value, current: &'a Value) -> Option<&'a Value> {
    match e {
        Expr::Literal(v) => Some(v),
        Expr::Path(p) => select(p, root, current).into_iter().next(),
        _ => None,
    }
}

fn truthy(e: &Expr, root: &Value, current: &Value) -> bool {
    match e {
        Expr::Path(p) => !select(p, root, current).is_empty(),
        Expr::Literal(v) => !matches!(v, Value::Null | Value::Bool(false)),
        Expr::Not(e) => !truthy(e, root, current),
        Expr::And(a, b) => truthy(a, root, current) && truthy(b, root, current),
        Expr::Or(a, b) => truthy(a, root, current) || truthy(b, root, current),
        Expr::Cmp(a, op, b) => {
            let (Some(a), Some(b)) = (operand(a, root, current), operand(b, root, current)) else {
                return false;
            };
            let order = match (a, b) {
                (Value::Number(x), Value::Number(y)) => x
                    .as_f64()
                    .unwrap_or(0.0)
                    .partial_cmp(&y.as_f64().unwrap_or(0.0)),
                (Value::String(x), Value::String(y)) => Some(x.cmp(y)),
                (Value::Bool(x), Value::Bool(y)) => Some(x.cmp(y)),
                _ => None,
            };
            let Some(order) = order else {
                return *op == Cmp::Ne;
            };
            use std::cmp::Ordering::*;
            match op {
                Cmp::Eq => order == Equal,
                Cmp::Ne => order != Equal,
                Cmp::Lt => order == Less,
                Cmp::Le => order != Greater,
                Cmp::Gt => order == Greater,
                Cmp::Ge => order != Less,
            }
        }
    }
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn skip_ws(&mut self) {
        while self.peek().is_some_and(|c| c.is_ascii_whitespace()) {
            self.i += 1;
        }
    }

    fn eat(&mut self, token: &str) -> bool {
        self.skip_ws();
        if self.s[self.i..].starts_with(token.as_bytes()) {
            self.i += token.len();
            true
        } else {
            false
        }
    }

    fn error(&self, expected: &str) -> String {
        format!(
            "expected {expected} at character {} of {:?}",
            self.i + 1,
            String::from_utf8_lossy(self.s)
        )
    }

    fn path(&mut self) -> Result<Path, String> {
        self.skip_ws();
        let relative = match self.peek() {
            Some(b'@') => true,
            Some(b'$') => false,
            _ => return Err(self.error("'@' or '$'")),
        };
        self.i += 1;
        let mut steps = Vec::new();
        loop {
            match self.peek() {
                Some(b'.') => {
                    self.i += 1;
                    if self.peek() == Some(b'*') {
                        self.i += 1;
                        steps.push(Selector::Wildcard);
                    } else {
                        steps.push(Selector::Key(self.label()?));
                    }
                }
                Some(b'[') => {
                    self.i += 1;
                    steps.push(self.bracket()?);
                }
                _ => return Ok(Path { relative, steps }),
            }
        }
    }

    fn label(&mut self) -> Result<String, String> {
        let start = self.i;
        while self
            .peek()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
        {
            self.i += 1;
        }
        if self.i == start {
            return Err(self.error("a member name"));
        }
        Ok(String::from_utf8_lossy(&self.s[start..self.i]).into_owned())
    }

    /// After `[`: keys, indices, `*`, unions of those, or a filter; then `]`.
    fn bracket(&mut self) -> Result<Selector, String> {
        let mut all = Vec::new();
        loop {
            self.skip_ws();
            let sel = match self.peek() {
                Some(b'*') => {
                    self.i += 1;
                    Selector::Wildcard
                }
                Some(b'\'' | b'"') => Selector::Key(self.string()?),
                Some(c) if c == b'-' || c.is_ascii_digit() => {
                    let start = self.i;
                    self.i += 1;
                    while self.peek().is_some_and(|c| c.is_ascii_digit()) {
                        self.i += 1;
                    }
                    let n = std::str::from_utf8(&self.s[start..self.i]).unwrap();
                    Selector::Index(n.parse().map_err(|_| self.error("an index"))?)
                }
                _ => Selector::Filter(self.or()?),
            };
            // A key or index followed by an operator is a filter's operand after all
            // (`['a'] = 1` does not occur in OpenWrt's scripts; keep it simple).
            all.push(sel);
            if self.eat(",") {
                continue;
            }
            if self.eat("]") {
                break;
            }
            return Err(self.error("',' or ']'"));
        }
        Ok(if all.len() == 1 {
            all.pop().unwrap()
        } else {
            Selector::Union(all)
        })
    }

    fn string(&mut self) -> Result<String, String> {
        let quote = self.peek().unwrap();
        self.i += 1;
        let mut out = Vec::new();
        while let Some(c) = self.peek() {
            self.i += 1;
            match c {
                b'\\' => {
                    let e = self.peek().ok_or_else(|| self.error("an escape"))?;
                    self.i += 1;
                    out.push(match e {
                        b'n' => b'\n',
                        b't' => b'\t',
                        other => other,
                    });
                }
                c if c == quote => return String::from_utf8(out).map_err(|e| e.to_string()),
                c => out.push(c),
            }
        }
        Err(self.error("the end of the string"))
    }

    fn or(&mut self) -> Result<Expr, String> {
        let mut e = self.and()?;
        while self.eat("||") {
            e = Expr::Or(Box::new(e), Box::new(self.and()?));
        }
        Ok(e)
    }

    fn and(&mut self) -> Result<Expr, String> {
        let mut e = self.unary()?;
        while self.eat("&&") {
            e = Expr::And(Box::new(e), Box::new(self.unary()?));
        }
        Ok(e)
    }

    fn unary(&mut self) -> Result<Expr, String> {
        if self.eat("!") {
            return Ok(Expr::Not(Box::new(self.unary()?)));
        }
        if self.eat("(") {
            let e = self.or()?;
            if !self.eat(")") {
                return Err(self.error("')'"));
            }
            return Ok(e);
        }
        let left = self.operand()?;
        for (token, op) in [
            ("!=", Cmp::Ne),
            ("<=", Cmp::Le),
            (">=", Cmp::Ge),
            ("==", Cmp::Eq),
            ("=", Cmp::Eq),
            ("<", Cmp::Lt),
            (">", Cmp::Gt),
        ] {
            if self.eat(token) {
                let right = self.operand()?;
                return Ok(Expr::Cmp(Box::new(left), op, Box::new(right)));
            }
        }
        Ok(left)
    }

    fn operand(&mut self) -> Result<Expr, String> {
        self.skip_ws();
        match self.peek() {
            Some(b'@' | b'$') => Ok(Expr::Path(self.path()?)),
            Some(b'\'' | b'"') => Ok(Expr::Literal(Value::String(self.string()?))),
            Some(c) if c == b'-' || c.is_ascii_digit() => {
                let start = self.i;
                self.i += 1;
                while self.peek().is_some_and(|c| c.is_ascii_digit() || c == b'.') {
                    self.i += 1;
                }
                let n = std::str::from_utf8(&self.s[start..self.i]).unwrap();
                serde_json::from_str(n)
                    .map(Expr::Literal)
                    .map_err(|_| self.error("a number"))
            }
            _ => {
                for (word, v) in [("true", true), ("false", false)] {
                    if self.eat(word) {
                        return Ok(Expr::Literal(Value::Bool(v)));
                    }
                }
                Err(self.error("a path, string, number or boolean"))
            }
        }
    }
}

/// `'…'` for the shell, a `'` inside as `'"'"'`.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\"'\"'"))
}

/// What `-e` prints for the matches: each on a line, or with a variable the shell
/// `export` the scripts eval, the values joined by the separators in turn (a space
/// escaped as `\ `).
pub fn render(pattern: &Pattern, matches: &[&Value], separator: &str, limit: usize) -> String {
    let matches = &matches[..matches.len().min(limit)];
    if matches.is_empty() {
        return String::new();
    }
    let Some(var) = pattern.var() else {
        let mut out = String::new();
        for m in matches {
            match m {
                Value::Null => continue,
                Value::String(s) => out.push_str(s),
                other => out.push_str(&other.to_string()),
            }
            out.push('\n');
        }
        return out;
    };
    let mut words = Vec::new();
    for m in matches {
        match m {
            Value::Object(o) => words.extend(o.keys().map(|k| shell_quote(k))),
            Value::Array(a) => words.extend((0..a.len()).map(|i| i.to_string())),
            Value::Bool(b) => words.push(u8::from(*b).to_string()),
            Value::Number(n) => words.push(n.to_string()),
            Value::String(s) => words.push(shell_quote(s)),
            Value::Null => {}
        }
    }
    let seps: Vec<char> = if separator.is_empty() {
        vec![' ']
    } else {
        separator.chars().collect()
    };
    let mut out = format!("export {var}=");
    for (i, w) in words.iter().enumerate() {
        if i > 0 {
            match seps[(i - 1) % seps.len()] {
                '"' => out.push_str("'\"'"),
                '\'' => out.push_str("\"'\""),
                ' ' => out.push_str("\\ "),
                c => out.push(c),
            }
        }
        out.push_str(w);
    }
    out.push_str("; ");
    out
}

/// What `-t` prints: the matches' types.
pub fn render_types(pattern: &Pattern, matches: &[&Value], limit: usize) -> String {
    let types: Vec<&str> = matches
        .iter()
        .take(limit)
        .map(|m| match m {
            Value::Null => "null",
            Value::Bool(_) => "boolean",
            Value::Number(n) if n.is_f64() => "double",
            Value::Number(_) => "int",
            Value::Object(_) => "object",
            Value::Array(_) => "array",
            Value::String(_) => "string",
        })
        .collect();
    match pattern.var() {
        Some(var) => format!("export {var}={}; ", types.join("\\ ")),
        None => format!("{}\n", types.join("\\ ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `ubus call network.interface dump` gives, cut down.
    fn dump() -> Value {
        serde_json::json!({"interface": [
            {"interface": "lan", "up": true, "proto": "static", "l3_device": "br-lan",
             "device": "br-lan",
             "ipv4-address": [{"address": "192.168.8.1", "mask": 24}],
             "ipv6-address": [{"address": "fd00:8::1", "mask": 64}],
             "route": [], "dns-server": []},
            {"interface": "wan", "up": true, "proto": "static", "l3_device": "eth1",
             "ipv4-address": [{"address": "10.99.0.2", "mask": 24}],
             "route": [{"target": "0.0.0.0", "mask": 0, "nexthop": "10.99.0.1"},
                       {"target": "0.0.0.0", "mask": 0, "nexthop": "10.99.0.9", "table": 7}],
             "dns-server": ["10.99.0.1", "2001:db8:99::1"]},
            {"interface": "cage", "up": false, "proto": "static", "l3_device": "br-cage",
             "ipv4-address": [{"address": "192.168.10.1", "mask": 24}]}
        ]})
    }

    fn eval(expr: &str, sep: &str, limit: usize) -> String {
        let p = Pattern::parse(expr).unwrap_or_else(|e| panic!("{expr}: {e}"));
        let doc = dump();
        render(&p, &p.matches(&doc), sep, limit)
    }

    #[test]
    fn network_sh_expressions() {
        assert_eq!(
            eval("X=@.interface[@.interface='cage'].l3_device", " ", 9),
            "export X='br-cage'; "
        );
        assert_eq!(
            eval(
                "X=@.interface[@.interface='lan']['ipv4-address'][0]['address','mask']",
                "/",
                9
            ),
            "export X='192.168.8.1'/24; "
        );
        assert_eq!(
            eval("X=@.interface[@.interface='wan']['dns-server'][*]", " ", 9),
            "export X='10.99.0.1'\\ '2001:db8:99::1'; "
        );
        assert_eq!(
            eval(
                "X=@.interface[@.interface='wan'].route[@.target='0.0.0.0' && !@.table].nexthop",
                "",
                1
            ),
            "export X='10.99.0.1'; "
        );
        assert_eq!(
            eval(
                "X=@.interface[@.route[@.target='0.0.0.0' && !@.table]].interface",
                "",
                1
            ),
            "export X='wan'; "
        );
        assert_eq!(
            eval(
                "X=@.interface[*]['ipv4-address'][*]['address','mask']",
                "/ ",
                9
            ),
            "export X='192.168.8.1'/24\\ '10.99.0.2'/24\\ '192.168.10.1'/24; "
        );
        assert_eq!(
            eval("X=@.interface[@.interface='lan'].up", " ", 9),
            "export X=1; "
        );
        // Nothing matched: nothing printed (network.sh then unsets the variable).
        assert_eq!(eval("X=@.interface[@.interface='guest'].proto", " ", 9), "");
    }

    #[test]
    fn plain_output_and_types() {
        assert_eq!(eval("@.interface[@.up=false].interface", " ", 9), "cage\n");
        assert_eq!(eval("@.interface[-1].up", " ", 9), "false\n");
        assert_eq!(
            eval("@.interface[0]['ipv4-address'][0]", " ", 9),
            "{\"address\":\"192.168.8.1\",\"mask\":24}\n"
        );
        let p = Pattern::parse("@.interface[0].up").unwrap();
        assert_eq!(render_types(&p, &p.matches(&dump()), 9), "boolean\n");
        assert_eq!(
            eval("X=@.interface[0]['ipv4-address'][0]", " ", 9),
            "export X='address'\\ 'mask'; "
        );
        assert_eq!(
            render(
                &Pattern::parse("X=$.a").unwrap(),
                &[&serde_json::json!("it's")],
                " ",
                9
            ),
            "export X='it'\"'\"'s'; "
        );
    }

    #[test]
    fn bad_expressions_say_where() {
        for bad in ["interface", "@.interface[", "@.a[@.b=]", "@.a['x'"] {
            let e = Pattern::parse(bad).unwrap_err();
            assert!(e.contains("expected"), "{bad}: {e}");
        }
    }
}
