//! What the bench ran on: CPUs, memory, kernel, hook tiers, and how busy the machine was.

use std::{path::Path, process::Command};

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Machine {
    pub nproc: usize,
    pub mem_total_mib: u64,
    pub kernel: String,
    pub cpu_model: String,
    /// (hook, tier) from `bridge-guard doctor --json`.
    pub hooks: Vec<(String, String)>,
    pub agent: String,
    pub loadavg_start: String,
    pub loadavg_end: String,
    /// Share of all CPUs busy over the run (the bench's own work included).
    pub busy_percent: Option<f64>,
    /// Share of CPU time the hypervisor took (steal).
    pub steal_percent: Option<f64>,
    /// The busiest other processes when the run started (`ps`).
    pub busiest_at_start: Vec<String>,
}

/// (busy, total, steal) jiffies from the first line of /proc/stat.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuTimes {
    busy: u64,
    total: u64,
    steal: u64,
}

pub fn cpu_times() -> CpuTimes {
    let Ok(text) = std::fs::read_to_string("/proc/stat") else {
        return CpuTimes::default();
    };
    let Some(line) = text.lines().find(|l| l.starts_with("cpu ")) else {
        return CpuTimes::default();
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let at = |i: usize| v.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal ...
    let total: u64 = v.iter().take(8).sum();
    let idle = at(3) + at(4);
    CpuTimes {
        busy: total.saturating_sub(idle),
        total,
        steal: at(7),
    }
}

fn first_line(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.lines().next().unwrap_or("").trim().to_owned())
        .unwrap_or_default()
}

fn hooks(bin: &Path) -> Vec<(String, String)> {
    let Ok(out) = Command::new(bin).args(["doctor", "--json"]).output() else {
        return Vec::new();
    };
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
        return Vec::new();
    };
    v["ebpf"]["hooks"]
        .as_array()
        .map(|hs| {
            hs.iter()
                .map(|h| {
                    (
                        h["hook"].as_str().unwrap_or("?").to_owned(),
                        h["tier"].as_str().unwrap_or("?").to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn busiest() -> Vec<String> {
    Command::new("ps")
        .args(["-eo", "pcpu,comm", "--sort=-pcpu", "--no-headers"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .take(5)
                .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
                .collect()
        })
        .unwrap_or_default()
}

pub fn collect(bin: &Path) -> Machine {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|v| v.split_once(':'))
        .map_or_else(|| "unknown".to_owned(), |(_, m)| m.trim().to_owned());
    let agent = Command::new(bin)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    Machine {
        nproc: std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
        mem_total_mib: mem_kib / 1024,
        kernel: first_line("/proc/sys/kernel/osrelease"),
        cpu_model,
        hooks: hooks(bin),
        agent: format!("{agent} ({})", bin.display()),
        loadavg_start: first_line("/proc/loadavg"),
        loadavg_end: String::new(),
        busy_percent: None,
        steal_percent: None,
        busiest_at_start: busiest(),
    }
}

impl Machine {
    /// Records how busy the machine was since `start`.
    pub fn finish(&mut self, start: CpuTimes) {
        let end = cpu_times();
        let total = end.total.saturating_sub(start.total);
        if total > 0 {
            #[expect(clippy::cast_precision_loss, reason = "percentages")]
            {
                self.busy_percent =
                    Some(end.busy.saturating_sub(start.busy) as f64 / total as f64 * 100.0);
                self.steal_percent =
                    Some(end.steal.saturating_sub(start.steal) as f64 / total as f64 * 100.0);
            }
        }
        self.loadavg_end = first_line("/proc/loadavg");
    }
}
