//! Firewall rules that drop the bridge's forwarded traffic: nftables (which also shows
//! iptables-nft's rules) and iptables-legacy, read and evaluated for a VM's packet to the
//! internet and for the reply, as the kernel would walk the forward hook's chains.

use std::collections::BTreeMap;

use serde_json::Value;

use super::{Finding, Report, tools};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dir {
    In,
    Out,
}

/// `iifname`/`oifname` (or `-i`/`-o`) compared with a list of names or patterns.
#[derive(Clone, Debug, PartialEq, Eq)]
struct IfaceMatch {
    dir: Dir,
    negate: bool,
    names: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Verdict {
    Accept,
    Drop,
    Jump(String),
    Goto(String),
    Return,
    /// No verdict (a counter, a log): on to the next rule.
    Continue,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Rule {
    ifaces: Vec<IfaceMatch>,
    /// Conditions other than interfaces (addresses, sets, marks...).
    other: bool,
    /// A conntrack-state condition that established connections meet (replies do, a VM's
    /// first packet does not).
    established: bool,
    verdict: Verdict,
    text: String,
}

#[derive(Clone, Debug, Default)]
struct Chain {
    /// Base chains on the forward hook have a policy; others return to their caller.
    policy: Option<Verdict>,
    rules: Vec<Rule>,
}

/// One table's chains, and which of them hook forwarding.
#[derive(Clone, Debug, Default)]
struct Table {
    /// e.g. `nftables table inet filter`.
    name: String,
    chains: BTreeMap<String, Chain>,
    forward: Vec<String>,
}

/// The packet being walked through the chains.
#[derive(Clone, Copy)]
struct Packet<'a> {
    iif: &'a str,
    /// `None`: not known (no route out).
    oif: Option<&'a str>,
    bridge: &'a str,
    /// A reply to a connection a VM opened (conntrack: established).
    reply: bool,
}

/// nft's `br*` and iptables' `br+` match by prefix; anything else exactly.
fn name_matches(pattern: &str, name: &str) -> bool {
    match pattern
        .strip_suffix('*')
        .or_else(|| pattern.strip_suffix('+'))
    {
        Some(prefix) => name.starts_with(prefix),
        None => pattern == name,
    }
}

impl IfaceMatch {
    /// Whether the packet matches; `None` when its interface is not known.
    fn eval(&self, p: Packet<'_>) -> Option<bool> {
        let name = match self.dir {
            Dir::In => Some(p.iif),
            Dir::Out => p.oif,
        }?;
        let hit = self.names.iter().any(|n| name_matches(n, name));
        Some(hit != self.negate)
    }

    fn names_bridge(&self, bridge: &str) -> bool {
        !self.negate && self.names.iter().any(|n| name_matches(n, bridge))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Outcome {
    Accepted,
    Dropped(String),
    Returned,
}

/// Walks `chain` for `p`: the outcome, and the first conditional drop naming the bridge on the
/// way (a rule that drops some of its traffic).
fn walk(table: &Table, chain: &str, p: Packet<'_>, depth: u8) -> (Outcome, Option<String>) {
    let Some(c) = table.chains.get(chain).filter(|_| depth < 16) else {
        return (Outcome::Returned, None);
    };
    let mut maybe = None;
    for r in &c.rules {
        let results: Vec<Option<bool>> = r.ifaces.iter().map(|m| m.eval(p)).collect();
        if results.contains(&Some(false)) || (r.established && !p.reply) {
            continue;
        }
        let conditional = r.other || results.contains(&None);
        let names_bridge = r.ifaces.iter().any(|m| m.names_bridge(p.bridge));
        let sub = |target: &str, maybe: &mut Option<String>| {
            let (o, m) = walk(table, target, p, depth + 1);
            if maybe.is_none() {
                *maybe = m;
            }
            o
        };
        match &r.verdict {
            Verdict::Accept if !conditional => return (Outcome::Accepted, maybe),
            Verdict::Drop if !conditional => return (Outcome::Dropped(r.text.clone()), maybe),
            Verdict::Drop if names_bridge && maybe.is_none() => maybe = Some(r.text.clone()),
            Verdict::Jump(t) => match sub(t, &mut maybe) {
                Outcome::Returned => {}
                o if !conditional => return (o, maybe),
                Outcome::Dropped(text) if names_bridge && maybe.is_none() => maybe = Some(text),
                _ => {}
            },
            Verdict::Goto(t) if !conditional => {
                let o = sub(t, &mut maybe);
                return (o, maybe);
            }
            Verdict::Return if !conditional => return (Outcome::Returned, maybe),
            _ => {}
        }
    }
    match &c.policy {
        Some(Verdict::Drop) => (
            Outcome::Dropped(format!("the chain's policy is drop ({chain})")),
            maybe,
        ),
        Some(_) => (Outcome::Accepted, maybe),
        None => (Outcome::Returned, maybe),
    }
}

// ---- nftables ----

fn nft_names(right: &Value) -> Option<Vec<String>> {
    match right {
        Value::String(s) if !s.starts_with('@') => Some(vec![s.clone()]),
        Value::Object(o) => o.get("set")?.as_array().map(|items| {
            items
                .iter()
                .filter_map(|i| i.as_str().map(str::to_owned))
                .collect()
        }),
        _ => None,
    }
}

/// One rule's expressions.
fn nft_rule(exprs: &[Value], text: String) -> Rule {
    let mut r = Rule {
        ifaces: Vec::new(),
        other: false,
        established: false,
        verdict: Verdict::Continue,
        text,
    };
    for e in exprs {
        let Some((key, v)) = e.as_object().and_then(|o| o.iter().next()) else {
            continue;
        };
        match key.as_str() {
            "match" => {
                let meta = v["left"]["meta"]["key"].as_str();
                let dir = match meta {
                    Some("iifname" | "iif") => Some(Dir::In),
                    Some("oifname" | "oif") => Some(Dir::Out),
                    _ => None,
                };
                let op = v["op"].as_str().unwrap_or("==");
                if v["left"]["ct"]["key"] == "state" && op != "!=" {
                    if v["right"].to_string().contains("established") {
                        r.established = true;
                    } else {
                        r.other = true;
                    }
                    continue;
                }
                match (dir, nft_names(&v["right"]), op) {
                    (Some(dir), Some(names), "==" | "in" | "!=") => r.ifaces.push(IfaceMatch {
                        dir,
                        negate: op == "!=",
                        names,
                    }),
                    _ => r.other = true,
                }
            }
            "accept" => r.verdict = Verdict::Accept,
            "drop" | "reject" => r.verdict = Verdict::Drop,
            "return" => r.verdict = Verdict::Return,
            "jump" | "goto" => {
                let t = v["target"].as_str().unwrap_or("").to_owned();
                r.verdict = if key == "jump" {
                    Verdict::Jump(t)
                } else {
                    Verdict::Goto(t)
                };
            }
            // iptables-nft's compatibility expressions.
            "xt" if v["type"] == "target" => match v["name"].as_str() {
                Some("REJECT" | "DROP") => r.verdict = Verdict::Drop,
                Some("ACCEPT") => r.verdict = Verdict::Accept,
                _ => {}
            },
            "counter" | "log" | "comment" => {}
            _ => r.other = true,
        }
    }
    r
}

/// `nft -a list ruleset` lines by (family, table, chain, handle), for evidence.
fn nft_texts(text: &str) -> BTreeMap<(String, String, String, u64), String> {
    let mut out = BTreeMap::new();
    let (mut table, mut chain) = ((String::new(), String::new()), String::new());
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["table", family, name, ..] => table = ((*family).to_owned(), (*name).to_owned()),
            ["chain", name, ..] => chain = (*name).to_owned(),
            _ => {
                if let Some((rule, handle)) = line.rsplit_once("# handle ") {
                    if let Ok(h) = handle.trim().parse() {
                        out.insert(
                            (table.0.clone(), table.1.clone(), chain.clone(), h),
                            rule.trim().to_owned(),
                        );
                    }
                }
            }
        }
    }
    out
}

/// The IPv4 tables of an `nft -j list ruleset`.
fn nft_tables(json: &Value, texts: &BTreeMap<(String, String, String, u64), String>) -> Vec<Table> {
    let mut tables: BTreeMap<(String, String), Table> = BTreeMap::new();
    let items = json["nftables"].as_array().cloned().unwrap_or_default();
    let key = |v: &Value| {
        (
            v["family"].as_str().unwrap_or("").to_owned(),
            v["table"].as_str().unwrap_or("").to_owned(),
        )
    };
    for item in &items {
        if let Some(c) = item.get("chain") {
            let (family, table) = key(c);
            if family != "ip" && family != "inet" {
                continue;
            }
            let name = c["name"].as_str().unwrap_or("").to_owned();
            let t = tables
                .entry((family.clone(), table.clone()))
                .or_insert_with(|| Table {
                    name: format!("nftables table {family} {table}"),
                    ..Table::default()
                });
            let chain = t.chains.entry(name.clone()).or_default();
            if c["hook"] == "forward" {
                chain.policy = Some(if c["policy"] == "drop" {
                    Verdict::Drop
                } else {
                    Verdict::Accept
                });
                t.forward.push(name);
            }
        }
    }
    for item in &items {
        let Some(r) = item.get("rule") else { continue };
        let (family, table) = key(r);
        let Some(t) = tables.get_mut(&(family.clone(), table.clone())) else {
            continue;
        };
        let chain = r["chain"].as_str().unwrap_or("").to_owned();
        let handle = r["handle"].as_u64().unwrap_or(0);
        let text = texts
            .get(&(family, table, chain.clone(), handle))
            .cloned()
            .unwrap_or_else(|| format!("rule {handle} of chain {chain}"));
        let exprs = r["expr"].as_array().cloned().unwrap_or_default();
        let rule = nft_rule(&exprs, format!("{text} (chain {chain})"));
        t.chains.entry(chain).or_default().rules.push(rule);
    }
    tables.into_values().collect()
}

// ---- iptables ----

/// Splits an `iptables-save` line into words, keeping "quoted strings" whole.
fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '"' => quoted = !quoted,
            c if c.is_whitespace() && !quoted => {
                if !cur.is_empty() {
                    words.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        words.push(cur);
    }
    words
}

fn ipt_rule(words: &[String], chains: &BTreeMap<String, Chain>, text: String) -> Rule {
    let mut r = Rule {
        ifaces: Vec::new(),
        other: false,
        established: false,
        verdict: Verdict::Continue,
        text,
    };
    let mut negate = false;
    let mut i = 0;
    while i < words.len() {
        let w = words[i].as_str();
        let next = words.get(i + 1).cloned().unwrap_or_default();
        match w {
            "!" => {
                negate = true;
                i += 1;
                continue;
            }
            "-A" | "--append" => i += 1,
            "-i" | "--in-interface" | "-o" | "--out-interface" => {
                r.ifaces.push(IfaceMatch {
                    dir: if w.starts_with("-i") || w == "--in-interface" {
                        Dir::In
                    } else {
                        Dir::Out
                    },
                    negate,
                    names: vec![next],
                });
                i += 1;
            }
            "-m" | "--match" if next == "comment" => {
                // `-m comment --comment TEXT` says nothing about packets.
                i += 3;
            }
            "-c" | "--set-counters" => i += 2,
            "--ctstate" | "--state" if !negate => {
                if next.contains("ESTABLISHED") {
                    r.established = true;
                } else {
                    r.other = true;
                }
                i += 1;
            }
            "-j" | "--jump" | "-g" | "--goto" => {
                r.verdict = match next.as_str() {
                    "ACCEPT" => Verdict::Accept,
                    "DROP" | "REJECT" => Verdict::Drop,
                    "RETURN" => Verdict::Return,
                    t if chains.contains_key(t) => {
                        if w == "-g" || w == "--goto" {
                            Verdict::Goto(t.to_owned())
                        } else {
                            Verdict::Jump(t.to_owned())
                        }
                    }
                    _ => Verdict::Continue,
                };
                // What follows are the target's own options, not conditions.
                break;
            }
            w if w.starts_with('-') => r.other = true,
            _ => {}
        }
        negate = false;
        i += 1;
    }
    r
}

/// The filter table of an `iptables-save`.
fn ipt_table(save: &str, source: &str) -> Option<Table> {
    let mut in_filter = false;
    let mut chains: BTreeMap<String, Chain> = BTreeMap::new();
    let mut rules: Vec<(String, Vec<String>, String)> = Vec::new();
    for line in save.lines() {
        if let Some(t) = line.strip_prefix('*') {
            in_filter = t == "filter";
            continue;
        }
        if !in_filter {
            continue;
        }
        if let Some(decl) = line.strip_prefix(':') {
            let mut f = decl.split_whitespace();
            let (Some(name), Some(policy)) = (f.next(), f.next()) else {
                continue;
            };
            chains.insert(
                name.to_owned(),
                Chain {
                    policy: (name == "FORWARD").then(|| {
                        if policy == "DROP" {
                            Verdict::Drop
                        } else {
                            Verdict::Accept
                        }
                    }),
                    rules: Vec::new(),
                },
            );
        } else if line.starts_with("-A ") {
            let words = shell_words(line);
            if let Some(chain) = words.get(1) {
                rules.push((chain.clone(), words, line.to_owned()));
            }
        }
    }
    if chains.is_empty() {
        return None;
    }
    for (chain, words, text) in rules {
        let rule = ipt_rule(&words, &chains, text);
        if let Some(c) = chains.get_mut(&chain) {
            c.rules.push(rule);
        }
    }
    Some(Table {
        name: format!("{source} table filter"),
        forward: vec!["FORWARD".into()],
        chains,
    })
}

// ---- the check ----

fn tables(report: &mut Report) -> Vec<Table> {
    let mut out = Vec::new();
    match (
        tools::run("nft", &["-j", "list", "ruleset"]),
        tools::run("nft", &["-a", "list", "ruleset"]),
    ) {
        (Ok(Some(json)), Ok(Some(text))) => match serde_json::from_str::<Value>(&json) {
            Ok(v) => out.extend(nft_tables(&v, &nft_texts(&text))),
            Err(e) => report
                .skipped
                .push(format!("nft -j list ruleset printed no JSON ({e})")),
        },
        (Ok(None), _) | (_, Ok(None)) => {
            // Without nft, iptables-nft's rules are still there for iptables-save.
            match tools::run("iptables-save", &[]) {
                Ok(Some(save)) => out.extend(ipt_table(&save, "iptables")),
                Ok(None) => report.skipped.push(
                    "neither nft nor iptables-save is installed: the firewall was not checked"
                        .into(),
                ),
                Err(e) => report.skipped.push(format!("iptables-save: {e}")),
            }
        }
        (Err(e), _) | (_, Err(e)) => report.skipped.push(format!("nftables not checked: {e}")),
    }
    // Legacy tables exist only once something loaded them; reading them loads nothing.
    let legacy = std::fs::read_to_string("/proc/net/ip_tables_names")
        .is_ok_and(|names| names.lines().any(|l| l.trim() == "filter"));
    if legacy {
        match tools::run("iptables-legacy-save", &[]) {
            Ok(Some(save)) => out.extend(ipt_table(&save, "iptables-legacy")),
            Ok(None) => report.skipped.push(
                "legacy iptables tables are loaded but iptables-legacy-save is not installed"
                    .into(),
            ),
            Err(e) => report.skipped.push(format!("iptables-legacy-save: {e}")),
        }
    }
    out
}

/// Adds a finding for each table whose forward chains drop the bridge's traffic.
pub fn check(bridge: &str, uplink: Option<&str>, report: &mut Report) {
    let outbound = Packet {
        iif: bridge,
        oif: uplink,
        bridge,
        reply: false,
    };
    let inbound = Packet {
        iif: uplink.unwrap_or("the uplink"),
        oif: Some(bridge),
        bridge,
        reply: true,
    };
    let up = uplink.unwrap_or("the uplink");
    for table in tables(report) {
        for chain in &table.forward {
            let mut drops = Vec::new();
            let mut maybes = Vec::new();
            for (what, p) in [
                (format!("from {bridge} to {up}"), outbound),
                (format!("from {up} to {bridge}"), inbound),
            ] {
                let (outcome, maybe) = walk(&table, chain, p, 0);
                match outcome {
                    Outcome::Dropped(rule) => drops.push(format!("{what}: {rule}")),
                    _ => maybes.extend(maybe.map(|m| format!("{what}: {m}"))),
                }
            }
            if !drops.is_empty() {
                report.findings.push(Finding {
                    kind: "firewall_drop",
                    cause: format!(
                        "{} (chain {chain}) drops the traffic {bridge} forwards",
                        table.name
                    ),
                    evidence: drops,
                    fix: format!(
                        "accept it before the drop, e.g. for nftables: nft insert rule <family> \
                         <table> {chain} iifname \"{bridge}\" accept; nft insert rule <family> \
                         <table> {chain} oifname \"{bridge}\" ct state established,related \
                         accept. A VPN's kill switch is the usual author: allow {bridge} in its \
                         settings (\"allow LAN\")"
                    ),
                });
            } else if !maybes.is_empty() {
                report.findings.push(Finding {
                    kind: "firewall_may_drop",
                    cause: format!(
                        "{} (chain {chain}) drops some of the traffic {bridge} forwards",
                        table.name
                    ),
                    evidence: maybes,
                    fix: format!(
                        "check that the rule's other conditions spare the VMs' traffic, or accept \
                         {bridge}'s traffic before it"
                    ),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p<'a>(iif: &'a str, oif: Option<&'a str>) -> Packet<'a> {
        Packet {
            iif,
            oif,
            bridge: "virbr0",
            reply: oif == Some("virbr0"),
        }
    }

    #[test]
    fn iptables_kill_switch_and_jumps() {
        let save = "*nat\n:POSTROUTING ACCEPT [0:0]\n-A POSTROUTING -s 192.168.122.0/24 -j MASQUERADE\nCOMMIT\n\
                    *filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:LIBVIRT_FWO - [0:0]\n\
                    -A FORWARD -m comment --comment \"libvirt out\" -j LIBVIRT_FWO\n\
                    -A FORWARD ! -o wg0 -j REJECT --reject-with icmp-port-unreachable\n\
                    -A LIBVIRT_FWO -s 10.0.0.0/8 -i virbr0 -j ACCEPT\nCOMMIT\n";
        let t = ipt_table(save, "iptables").expect("filter table");
        // The libvirt accept has an address condition: the kill switch still decides.
        let (o, _) = walk(&t, "FORWARD", p("virbr0", Some("eth0")), 0);
        assert!(
            matches!(&o, Outcome::Dropped(r) if r.contains("! -o wg0")),
            "{o:?}"
        );
        let (o, _) = walk(&t, "FORWARD", p("virbr0", Some("wg0")), 0);
        assert_eq!(o, Outcome::Accepted);
    }

    #[test]
    fn nft_policy_drop_unless_accepted_and_conditional_drops() {
        let json: Value = serde_json::from_str(
            r#"{"nftables":[{"metainfo":{}},
            {"table":{"family":"inet","name":"fw","handle":1}},
            {"chain":{"family":"inet","table":"fw","name":"fwd","handle":1,"type":"filter","hook":"forward","prio":0,"policy":"drop"}},
            {"chain":{"family":"inet","table":"fw","name":"vms","handle":2}},
            {"rule":{"family":"inet","table":"fw","chain":"fwd","handle":3,"expr":[{"match":{"op":"==","left":{"ct":{"key":"state"}},"right":["established","related"]}},{"accept":null}]}},
            {"rule":{"family":"inet","table":"fw","chain":"fwd","handle":4,"expr":[{"match":{"op":"==","left":{"meta":{"key":"iifname"}},"right":{"set":["virbr0","virbr1"]}}},{"jump":{"target":"vms"}}]}},
            {"rule":{"family":"inet","table":"fw","chain":"vms","handle":5,"expr":[{"match":{"op":"==","left":{"ip":{"key":"daddr","protocol":"ip"}},"right":"10.0.0.1"}},{"match":{"op":"==","left":{"meta":{"key":"iifname"}},"right":"virbr0"}},{"drop":null}]}},
            {"rule":{"family":"inet","table":"fw","chain":"vms","handle":6,"expr":[{"counter":{"packets":0,"bytes":0}},{"accept":null}]}}
            ]}"#,
        )
        .expect("json");
        let texts = nft_texts(
            "table inet fw {\n\tchain vms {\n\t\tip daddr 10.0.0.1 iifname \"virbr0\" drop # handle 5\n\t}\n}\n",
        );
        let tables = nft_tables(&json, &texts);
        assert_eq!(tables.len(), 1);
        let t = &tables[0];
        let (o, maybe) = walk(t, "fwd", p("virbr0", Some("eth0")), 0);
        assert_eq!(o, Outcome::Accepted);
        assert!(
            maybe.is_some_and(|m| m.starts_with("ip daddr 10.0.0.1 iifname \"virbr0\" drop")),
            "the conditional drop naming the bridge is reported"
        );
        // Replies are established: accepted before the policy drops everything else.
        let (o, _) = walk(t, "fwd", p("eth0", Some("virbr0")), 0);
        assert_eq!(o, Outcome::Accepted);
        // A new connection from outside to a VM is not: the policy drops it.
        let inbound_new = Packet {
            reply: false,
            ..p("eth0", Some("virbr0"))
        };
        let (o, _) = walk(t, "fwd", inbound_new, 0);
        assert!(
            matches!(o, Outcome::Dropped(ref r) if r.contains("policy")),
            "{o:?}"
        );
    }

    #[test]
    fn interface_patterns() {
        assert!(name_matches("vnet*", "vnet12") && name_matches("br+", "br0"));
        assert!(!name_matches("virbr0", "virbr01"));
        assert_eq!(
            shell_words(r#"-A X -m comment --comment "two words" -j DROP"#),
            [
                "-A",
                "X",
                "-m",
                "comment",
                "--comment",
                "two words",
                "-j",
                "DROP"
            ]
        );
    }
}
