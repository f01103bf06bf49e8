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
    /// Processes outside the bench that used the most CPU during the run: (command, average
    /// share of one CPU in %), from `/proc` sampled every few seconds.
    #[serde(default)]
    pub other_load: Vec<(String, f64)>,
}

/// Samples `/proc` every few seconds on a thread and adds up the CPU time of every process that
/// is not the bench or one of its descendants (agent, shell guard, fix scripts, `ip`).
pub struct LoadSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<(String, f64)>>>,
}

/// (pid, ppid, comm, utime+stime ticks) of every process.
fn processes() -> Vec<(u32, u32, String, u64)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let open = text.find('(')?;
            let close = text.rfind(')')?;
            let comm = text.get(open + 1..close)?.to_owned();
            let f: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
            let ppid = f.get(1)?.parse().ok()?;
            let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
            Some((pid, ppid, comm, ticks))
        })
        .collect()
}

impl LoadSampler {
    pub fn start() -> Self {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = std::sync::Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let me = std::process::id();
            let started = std::time::Instant::now();
            let mut last: std::collections::HashMap<u32, u64> = std::collections::HashMap::new();
            let mut by_comm: std::collections::BTreeMap<String, u64> =
                std::collections::BTreeMap::new();
            loop {
                let procs = processes();
                let parent: std::collections::HashMap<u32, u32> =
                    procs.iter().map(|(p, pp, _, _)| (*p, *pp)).collect();
                let ours = |mut pid: u32| {
                    for _ in 0..64 {
                        if pid == me {
                            return true;
                        }
                        match parent.get(&pid) {
                            Some(&pp) if pp != 0 => pid = pp,
                            _ => return false,
                        }
                    }
                    false
                };
                for (pid, _, comm, ticks) in &procs {
                    let before = last.insert(*pid, *ticks);
                    if ours(*pid) {
                        continue;
                    }
                    if let Some(b) = before {
                        *by_comm.entry(comm.clone()).or_default() += ticks.saturating_sub(b);
                    }
                }
                if flag.load(Ordering::Relaxed) {
                    break;
                }
                // The sampling period of this load monitor.
                for _ in 0..20 {
                    if flag.load(Ordering::Relaxed) {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
            }
            let secs = started.elapsed().as_secs_f64().max(1.0);
            #[expect(clippy::cast_precision_loss, reason = "percentages")]
            let tck = super::stats::clk_tck() as f64;
            let mut v: Vec<(String, f64)> = by_comm
                .into_iter()
                .map(|(c, t)| {
                    #[expect(clippy::cast_precision_loss, reason = "percentages")]
                    let pct = t as f64 / tck / secs * 100.0;
                    (c, pct)
                })
                .filter(|(_, p)| *p >= 1.0)
                .collect();
            v.sort_by(|a, b| b.1.total_cmp(&a.1));
            v.truncate(5);
            v
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops sampling; the busiest other commands over the run.
    pub fn finish(mut self) -> Vec<(String, f64)> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
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
        other_load: Vec::new(),
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
