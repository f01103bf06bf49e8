//! The eBPF source: loads the embedded programs with offsets from BTF, picks a hook tier per
//! thing observed, and streams decoded events from the ring buffer.

mod attach_btf;
mod btf;
pub mod hooks;
pub mod offsets;
pub mod ring;

use std::path::PathBuf;

use aya::{Btf, Ebpf, EbpfLoader, maps::Array};
use bridge_guard_common::settings;

use self::hooks::{HookReport, Tier};
use crate::sys::{caps, kallsyms};

/// The eBPF object built by `build.rs`; empty when the eBPF toolchain was missing at build time.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bridge-guard"));

/// Whether this build carries its eBPF programs (for `bridge_guard_build_info`).
pub fn embedded() -> bool {
    !OBJECT.is_empty()
}

/// The function every port's forward-delay timer runs; the tracepoint tier matches on it.
pub const FD_TIMER_SYMBOL: &str = "br_forward_delay_timer_expired";

#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error(
        "this bridge-guard was built without its eBPF programs (bpf-linker was missing at build \
         time); run `cargo xtask setup` and rebuild"
    )]
    NotBuilt,
    #[error("cannot load the eBPF object")]
    Load(#[source] aya::EbpfError),
    #[error("eBPF map {0} is missing from the object")]
    MissingMap(&'static str),
    #[error("cannot poll the ring buffer")]
    Poll(#[source] std::io::Error),
    #[error("eBPF map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
}

/// Where to find kernel facts; tests and the VM matrix point these elsewhere.
#[derive(Clone, Debug)]
pub struct Options {
    /// Report only this network namespace (inode); `None` reports all.
    pub netns: Option<u32>,
    pub btf_dir: PathBuf,
    pub kallsyms: PathBuf,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            netns: None,
            btf_dir: PathBuf::from("/sys/kernel/btf"),
            kallsyms: PathBuf::from("/proc/kallsyms"),
        }
    }
}

/// What start-up found out about the kernel, for logs and `doctor`.
#[derive(Clone, Debug)]
pub struct KernelFacts {
    pub offsets: offsets::Resolved,
    /// Why offsets could not be resolved at all, if they could not.
    pub offsets_error: Option<String>,
    pub fd_timer_fn: Option<u64>,
    pub memlock: caps::Memlock,
    /// aya's view of the kernel BTF, needed to load fentry/fexit and tp_btf programs.
    pub btf_loaded: hooks::Outcome,
}

impl KernelFacts {
    pub fn gather(opts: &Options) -> (Self, Option<Btf>) {
        let mut facts = Self::gather_facts(opts);
        let btf = facts.parse_btf(opts);
        (facts, btf)
    }

    /// Everything but aya's BTF (see [`KernelFacts::parse_btf`]).
    pub fn gather_facts(opts: &Options) -> Self {
        let memlock = caps::ensure_memlock();
        if memlock.is_problem() {
            tracing::warn!("RLIMIT_MEMLOCK {memlock}");
        } else {
            tracing::info!("RLIMIT_MEMLOCK {memlock}");
        }
        let (offsets, offsets_error) = match offsets::resolve(&opts.btf_dir) {
            Ok(resolved) => {
                if !resolved.absent.is_empty() {
                    tracing::warn!(absent = ?resolved.absent, "kernel BTF lacks some fields; events will miss them");
                }
                (resolved, None)
            }
            Err(e) => {
                tracing::warn!("{}", crate::error_chain(&e));
                (offsets::Resolved::none(), Some(crate::error_chain(&e)))
            }
        };
        let fd_timer_fn = match kallsyms::lookup(&opts.kallsyms, FD_TIMER_SYMBOL) {
            Ok(addr) => addr,
            Err(e) => {
                tracing::warn!("cannot read {}: {e}", opts.kallsyms.display());
                None
            }
        };
        Self {
            offsets,
            offsets_error,
            fd_timer_fn,
            memlock,
            btf_loaded: Err("not parsed yet".into()),
        }
    }

    /// aya's view of the kernel BTF (needed to load fentry/fexit and tp_btf programs), cut
    /// down to what the hooks look up (`attach_btf`); notes whether it could be had.
    fn parse_btf(&mut self, opts: &Options) -> Option<Btf> {
        let btf = attach_btf::read(&opts.btf_dir.join("vmlinux"));
        self.btf_loaded = btf.as_ref().map(drop).map_err(|e| crate::error_chain(e));
        btf.ok()
    }
}

/// Loaded and attached programs. Dropping this detaches everything.
pub struct Probes {
    ebpf: Ebpf,
    pub hooks: Vec<HookReport>,
    /// Outcome of attaching the timer-context programs beside a better port-state tier.
    pub timer_context: Option<hooks::Outcome>,
    pub facts: KernelFacts,
    opts: Options,
    /// Whether the bridge's functions were in the kernel when the hooks were chosen.
    bridge_code_at_start: bool,
}

/// Whether the bridge's code is in the kernel (built in, or its module loaded).
fn bridge_code_present(kallsyms: &std::path::Path) -> bool {
    kallsyms::lookup(kallsyms, "br_set_state")
        .ok()
        .flatten()
        .is_some()
}

fn tier_of(hooks: &[HookReport], hook: &str) -> Tier {
    hooks
        .iter()
        .find(|h| h.hook == hook)
        .map_or(Tier::None, |h| h.tier)
}

/// Attaches the timer-context programs beside a fentry/kprobe port-state tier, and tells the
/// timer programs whether they are the port-state tier themselves.
fn arm_port_state(
    ebpf: &mut Ebpf,
    btf: Option<&Btf>,
    port_tier: Tier,
) -> Result<Option<hooks::Outcome>, EbpfError> {
    let timer_context = matches!(port_tier, Tier::Fentry | Tier::Kprobe).then(|| {
        let r = hooks::try_tier(ebpf, btf, hooks::TIMER_CONTEXT);
        match &r {
            Ok(()) => tracing::info!(
                "timer context: tracepoint (state changes by the STP timer are attributed to it)"
            ),
            Err(e) => tracing::warn!(
                "timer context: none ({e}); timer-driven changes show the interrupted task"
            ),
        }
        r
    });
    let map_err = |source| EbpfError::Map {
        name: "SETTINGS",
        source,
    };
    let mut settings_map: Array<_, u32> = Array::try_from(
        ebpf.map_mut("SETTINGS")
            .ok_or(EbpfError::MissingMap("SETTINGS"))?,
    )
    .map_err(map_err)?;
    settings_map
        .set(
            settings::TIMER_TIER,
            u32::from(port_tier == Tier::Tracepoint),
            0,
        )
        .map_err(map_err)?;
    Ok(timer_context)
}

/// Loads the programs with this kernel's offsets, without attaching any.
pub fn load_object(opts: &Options, facts: &KernelFacts) -> Result<Ebpf, EbpfError> {
    if OBJECT.is_empty() {
        return Err(EbpfError::NotBuilt);
    }
    let netns = opts.netns.unwrap_or(0);
    let fd_timer = facts.fd_timer_fn.unwrap_or(0);
    EbpfLoader::new()
        .override_global("OFFSETS", &facts.offsets.offsets, true)
        .override_global("FD_TIMER_FN", &fd_timer, true)
        .override_global("NETNS_FILTER", &netns, true)
        .load(OBJECT)
        .map_err(EbpfError::Load)
}

impl Probes {
    /// Loads the programs, picks and attaches a tier per hook, and arms the tracepoint tier if
    /// it was chosen.
    ///
    /// Memory: vmlinux BTF is read by our own reader, one file at a time (offsets, then the
    /// ids aya is handed in `attach_btf`); aya's loader parses none (third_party/aya), and the
    /// freed heap goes back to the system afterwards. Start-up's peak is mostly this.
    pub fn attach(opts: &Options) -> Result<Self, EbpfError> {
        let mut facts = KernelFacts::gather_facts(opts);
        let ebpf = load_object(opts, &facts)?;
        let btf = facts.parse_btf(opts);
        let probes = Self::attach_loaded(opts, facts, btf.as_ref(), ebpf);
        drop(btf);
        crate::sys::memory::trim();
        probes
    }

    /// [`Probes::attach`] with facts already gathered.
    pub fn attach_with(
        opts: &Options,
        facts: KernelFacts,
        btf: Option<&Btf>,
    ) -> Result<Self, EbpfError> {
        let ebpf = load_object(opts, &facts)?;
        Self::attach_loaded(opts, facts, btf, ebpf)
    }

    fn attach_loaded(
        opts: &Options,
        facts: KernelFacts,
        btf: Option<&Btf>,
        mut ebpf: Ebpf,
    ) -> Result<Self, EbpfError> {
        let timer_ok = |hook: &str, tier: Tier| -> Result<(), String> {
            if tier != Tier::Tracepoint || hook != "port-state" {
                return Ok(());
            }
            if facts.fd_timer_fn.is_none() {
                return Err(format!(
                    "{FD_TIMER_SYMBOL} not found in {}",
                    opts.kallsyms.display()
                ));
            }
            let o = &facts.offsets.offsets;
            if o.port_fd_timer == bridge_guard_common::ABSENT
                || o.timer_function == bridge_guard_common::ABSENT
            {
                return Err(
                    "BTF lacks net_bridge_port.forward_delay_timer or timer_list.function".into(),
                );
            }
            Ok(())
        };
        let hooks = hooks::select(&mut ebpf, btf, timer_ok);
        let port_tier = tier_of(&hooks, "port-state");
        let timer_context = arm_port_state(&mut ebpf, btf, port_tier)?;
        let bridge_code_at_start = bridge_code_present(&opts.kallsyms);
        Ok(Self {
            ebpf,
            hooks,
            timer_context,
            facts,
            opts: opts.clone(),
            bridge_code_at_start,
        })
    }

    /// Where bridge is a module loaded after start, the fentry/kprobe tiers that failed for
    /// lack of its functions can now attach: retries them once, when `br_set_state` has
    /// appeared in kallsyms. Returns what changed (`hook now tier`), if it retried.
    pub fn retry_after_bridge_module(&mut self) -> Result<Option<Vec<String>>, EbpfError> {
        if self.bridge_code_at_start || !bridge_code_present(&self.opts.kallsyms) {
            return Ok(None);
        }
        self.bridge_code_at_start = true;
        let btf = attach_btf::read(&self.opts.btf_dir.join("vmlinux")).ok();
        let mut changed = Vec::new();
        for (spec, report) in hooks::HOOKS.iter().zip(self.hooks.iter_mut()) {
            let was = report.tier;
            // Better tiers only, and not the tracepoint tier: its globals were set at load.
            for &(tier, progs) in spec
                .tiers
                .iter()
                .take_while(|(t, _)| *t != was && *t != Tier::Tracepoint)
            {
                match hooks::try_tier(&mut self.ebpf, btf.as_ref(), progs) {
                    Ok(()) => {
                        if was == Tier::Tracepoint {
                            hooks::unload_all(&mut self.ebpf, hooks::TIMER_ONLY_TIER);
                        }
                        report.tier = tier;
                        report.failures.retain(|f| f.tier != tier);
                        changed.push(format!("{} now {tier}", spec.name));
                        break;
                    }
                    Err(reason) => {
                        if let Some(f) = report.failures.iter_mut().find(|f| f.tier == tier) {
                            f.reason = reason;
                        }
                    }
                }
            }
        }
        if changed.iter().any(|c| c.starts_with("port-state")) {
            self.timer_context = {
                let tier = self.tier("port-state");
                arm_port_state(&mut self.ebpf, btf.as_ref(), tier)?
            };
        }
        Ok(Some(changed))
    }

    /// The tier chosen for `hook`.
    pub fn tier(&self, hook: &str) -> Tier {
        tier_of(&self.hooks, hook)
    }

    /// `hook=tier ...`, for readiness lines and sd_notify STATUS.
    pub fn summary(&self) -> String {
        self.hooks
            .iter()
            .map(|h| format!("{}={}", h.hook, h.tier))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Takes the event stream; call once.
    pub fn events(&mut self) -> Result<ring::EventStream, EbpfError> {
        ring::EventStream::new(&mut self.ebpf)
    }

    /// Takes the MAC-flap reports of loop detection (`fdb-flap`); call once.
    pub fn fdb_flaps(&mut self) -> Result<crate::loop_guard::flap::FlapStream, EbpfError> {
        crate::loop_guard::flap::FlapStream::new(&mut self.ebpf)
    }
}

/// Loads every program without attaching it: proves the verifier accepts each one here, even
/// those whose hook cannot attach on this kernel. `(program, Ok | reason)` per program.
pub fn verify_all(
    opts: &Options,
    facts: &KernelFacts,
    btf: Option<&Btf>,
) -> Result<Vec<(&'static str, hooks::Outcome)>, EbpfError> {
    let mut ebpf = load_object(opts, facts)?;
    let mut seen = std::collections::BTreeMap::new();
    for spec in hooks::HOOKS {
        for &(_, progs) in spec.tiers {
            for &prog in progs {
                seen.entry(prog.program())
                    .or_insert_with(|| hooks::load(&mut ebpf, btf, prog));
            }
        }
    }
    Ok(seen.into_iter().collect())
}
