//! `bridge-guard doctor`: what this kernel allows, and which hook tier each observation gets;
//! with `--path BRIDGE`, what stops the bridge's VM traffic beyond layer 2.

use std::fmt::Write as _;

use serde_json::json;

use crate::{
    path_check,
    sources::ebpf::{self, FD_TIMER_SYMBOL, Options, Probes, hooks::Outcome, offsets},
    sys::{
        caps,
        color::{ColorChoice, Style},
        kallsyms,
    },
};

#[derive(Debug, clap::Args)]
#[command(after_help = "With --path, the exit status is 1 when a cause was found, else 0.")]
pub struct Args {
    /// Print the report as one JSON object.
    #[arg(short = 'j', long)]
    json: bool,
    /// Instead of the hook report: check BRIDGE and what stops its VMs' traffic beyond layer
    /// 2 (a VPN's default route, firewall drops, strict rp_filter, forwarding off, no
    /// DHCP/DNS server), each cause with its evidence and a fix. Changes nothing.
    #[arg(long, value_name = "BRIDGE", value_parser = super::guard_args::bridge_name)]
    path: Option<String>,
    /// Colour the report.
    #[arg(long, value_enum, default_value_t, value_name = "WHEN")]
    color: ColorChoice,
}

/// `doctor --path BRIDGE`.
fn path(bridge: &str, args: &Args) -> anyhow::Result<()> {
    let report = path_check::check(bridge)?;
    if args.json {
        println!("{:#}", serde_json::to_value(&report)?);
    } else {
        let style = Style::stdout(args.color);
        let mut out = String::new();
        let w = &mut out;
        writeln!(w, "bridge-guard doctor --path {bridge}")?;
        if !report.summary.is_empty() {
            writeln!(w, "  {}", report.summary)?;
        }
        for (i, f) in report.findings.iter().enumerate() {
            writeln!(w, "\n  {}. {}", i + 1, style.bad(&f.cause))?;
            for e in &f.evidence {
                writeln!(w, "     evidence: {e}")?;
            }
            writeln!(w, "     fix: {}", f.fix)?;
        }
        for s in &report.skipped {
            writeln!(w, "\n  {} {s}", style.warn("not checked:"))?;
        }
        if report.findings.is_empty() {
            writeln!(
                w,
                "\n  {}",
                style.good("nothing found that stops the VMs' traffic")
            )?;
        }
        print!("{out}");
    }
    if report.findings.is_empty() {
        Ok(())
    } else {
        Err(super::status::Exit(1).into())
    }
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "unknown".to_owned(), |s| s.trim().to_owned())
}

/// Where the bridge code lives: built in, a loaded module, or not loaded at all.
fn bridge_code(opts: &Options) -> String {
    match kallsyms::find(&opts.kallsyms, "br_set_state") {
        Ok(Some(sym)) => match sym.module {
            Some(m) => format!("module {m} (loaded)"),
            None => "built in".to_owned(),
        },
        Ok(None) => "not loaded (modprobe bridge, or create a bridge)".to_owned(),
        Err(e) => format!("unknown ({}: {e})", opts.kallsyms.display()),
    }
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    if let Some(bridge) = &args.path {
        return path(bridge, args);
    }
    let opts = Options::default();
    let caps = caps::Caps::current().ok();
    let (facts, btf) = ebpf::KernelFacts::gather(&opts);
    let probes = Probes::attach_with(&opts, facts.clone(), btf.as_ref());
    let programs = ebpf::verify_all(&opts, &facts, btf.as_ref());
    let module_btf = opts.btf_dir.join("bridge");

    let capabilities: Vec<_> = caps::WANTED
        .iter()
        .map(|&(num, name, why)| (name, caps.is_some_and(|c| c.has(num)), why))
        .collect();
    let offsets = offsets::describe(&facts.offsets.offsets);

    if args.json {
        let report = json!({
            "kernel": kernel_release(),
            "bridge": bridge_code(&opts),
            "btf": {
                "vmlinux": opts.btf_dir.join("vmlinux").exists(),
                "bridge_module": module_btf.exists(),
                "sources": facts.offsets.sources,
                "error": facts.offsets_error,
            },
            "offsets": offsets.iter().map(|(n, v)| (n.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
            "fd_timer_fn": facts.fd_timer_fn.map(|a| format!("{a:#x}")),
            "capabilities": capabilities.iter().map(|(n, has, _)| (n.to_string(), json!(has))).collect::<serde_json::Map<_, _>>(),
            "memlock": facts.memlock.to_string(),
            "ebpf": match &probes {
                Ok(p) => json!({
                    "loaded": true,
                    "ring_buffer": true,
                    "hooks": p.hooks,
                    "timer_context": p.timer_context.as_ref().map(outcome),
                }),
                Err(e) => json!({ "loaded": false, "error": crate::error_chain(e) }),
            },
            "programs": match &programs {
                Ok(list) => list.iter().map(|(n, r)| (n.to_string(), json!(outcome(r)))).collect::<serde_json::Map<_, _>>(),
                Err(_) => serde_json::Map::new(),
            },
        });
        println!("{report:#}");
        return Ok(());
    }

    let mut out = String::new();
    let w = &mut out;
    writeln!(w, "bridge-guard doctor")?;
    writeln!(w, "  kernel        {}", kernel_release())?;
    writeln!(w, "  bridge code   {}", bridge_code(&opts))?;
    writeln!(
        w,
        "  btf           vmlinux: {}; bridge module: {}",
        yes_no(opts.btf_dir.join("vmlinux").exists()),
        if module_btf.exists() {
            "yes"
        } else {
            "no (fine where bridge is built in)"
        }
    )?;
    let resolved = offsets.iter().filter(|(_, v)| v.is_some()).count();
    writeln!(
        w,
        "  offsets       {resolved}/{} resolved from BTF",
        offsets.len()
    )?;
    for (name, v) in &offsets {
        match v {
            Some(v) => writeln!(w, "                  {name:<38} {v}")?,
            None => writeln!(w, "                  {name:<38} absent")?,
        }
    }
    if let Some(e) = &facts.offsets_error {
        writeln!(w, "                  error: {e}")?;
    }
    match facts.fd_timer_fn {
        Some(a) => writeln!(w, "  kallsyms      {FD_TIMER_SYMBOL} at {a:#x}")?,
        None => writeln!(
            w,
            "  kallsyms      {FD_TIMER_SYMBOL} not found: no tracepoint tier"
        )?,
    }
    writeln!(w, "  capabilities")?;
    for (name, has, why) in &capabilities {
        writeln!(w, "                  {name:<18} {:<4} {why}", yes_no(*has))?;
    }
    writeln!(w, "  memlock       {}", facts.memlock)?;
    match &probes {
        Ok(p) => {
            writeln!(w, "  ring buffer   ok")?;
            writeln!(w, "\n  {:<12} {:<11} why not a better tier", "hook", "tier")?;
            for h in &p.hooks {
                let why: Vec<String> = h
                    .failures
                    .iter()
                    .map(|f| format!("{}: {}", f.tier, f.reason))
                    .collect();
                writeln!(
                    w,
                    "  {:<12} {:<11} {}",
                    h.hook,
                    h.tier.to_string(),
                    why.join("; ")
                )?;
            }
            if let Some(r) = &p.timer_context {
                let state = r
                    .as_ref()
                    .map_or_else(|e| format!("none ({e})"), |()| "tracepoint".into());
                writeln!(w, "  {:<12} {state}", "timer-ctx")?;
            }
        }
        Err(e) => {
            writeln!(
                w,
                "  ebpf          not available: {}",
                crate::error_chain(e)
            )?;
            writeln!(
                w,
                "                bridge-guard can still run on netlink alone"
            )?;
        }
    }
    if let Ok(list) = &programs {
        writeln!(
            w,
            "\n  programs (loaded to check the verifier, whether or not they attach here)"
        )?;
        for (name, r) in list {
            match r {
                Ok(()) => writeln!(w, "    {name:<22} ok")?,
                Err(e) => writeln!(w, "    {name:<22} {e}")?,
            }
        }
    }
    print!("{out}");
    Ok(())
}

fn outcome(r: &Outcome) -> String {
    r.as_ref().map_or_else(Clone::clone, |()| "ok".to_owned())
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}
