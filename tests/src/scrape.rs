//! Reading the agent's `/metrics` as Prometheus would: over HTTP inside the lab's namespace,
//! parsed with a real text-format parser.

use anyhow::{Context as _, Result};
use prometheus_parse::{Sample, Scrape, Value as PromValue};

use crate::{Agent, http_get};

/// `--metrics 127.0.0.1:0` picks a free port; the readiness line says which (`host:port`).
pub fn metrics_addr(agent: &Agent) -> Result<String> {
    let url = agent
        .ready
        .split_whitespace()
        .find_map(|w| w.strip_prefix("http://"))
        .with_context(|| format!("the readiness line names no metrics URL: {}", agent.ready))?;
    Ok(url
        .trim_end_matches(')')
        .trim_end_matches("/metrics")
        .to_owned())
}

/// Scrapes the agent from inside namespace `ns`.
pub fn scrape(ns: &str, agent: &Agent) -> Result<Scrape> {
    let body = http_get(ns, &metrics_addr(agent)?, "/metrics")?;
    parse(&body)
}

/// Parses Prometheus text (a scrape or a textfile).
pub fn parse(text: &str) -> Result<Scrape> {
    Ok(Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))?)
}

/// The first sample of `name` whose labels include `labels`.
pub fn find<'a>(scrape: &'a Scrape, name: &str, labels: &[(&str, &str)]) -> Option<&'a Sample> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
}

/// The value of a counter, gauge or untyped sample; panics (failing the test) when absent.
pub fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    match find(scrape, name, labels).map(|s| &s.value) {
        Some(PromValue::Counter(v) | PromValue::Gauge(v) | PromValue::Untyped(v)) => *v,
        other => panic!("no {name}{labels:?} in the scrape: {other:?}"),
    }
}

/// (count, sum) of a histogram; panics (failing the test) when absent.
pub fn histogram(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> (f64, f64) {
    match find(scrape, name, labels).map(|s| &s.value) {
        Some(PromValue::Histogram(buckets)) => {
            let count = buckets.iter().map(|b| b.count).fold(0.0, f64::max);
            let sum = value(scrape, &format!("{name}_sum"), labels);
            (count, sum)
        }
        other => panic!("no histogram {name}{labels:?}: {other:?}"),
    }
}
