//! `bridge-guard fix BRIDGE`: one repair pass, then exit (what a fix script did, done right).

use anyhow::{Context as _, bail};

use super::guard_args::{PolicyArgs, bridge_name};
use crate::{
    actuator,
    config::Settings,
    membership,
    model::Model,
    planner,
    sources::netlink::{self, Netlink},
    sys::{caps::Caps, clock::monotonic_ns},
};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The bridge to repair, e.g. virbr0.
    #[arg(value_parser = bridge_name)]
    bridge: String,
    /// Print what would be done, and do nothing.
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    pub policy: PolicyArgs,
}

pub async fn run(args: Args, settings: Settings) -> anyhow::Result<()> {
    if !args.dry_run && !Caps::current().is_ok_and(|c| c.has(12)) {
        bail!(
            "repairing needs CAP_NET_ADMIN, which this process lacks: run it as root (or use --dry-run)"
        );
    }
    let guards = args
        .policy
        .guards(std::slice::from_ref(&args.bridge), &settings)?;
    let nl = Netlink::open()?;
    let mut model = Model::new([args.bridge.clone()]);
    model.reset(nl.dump().await?, monotonic_ns());
    if let Ok(mrp) = netlink::mrp_bridges(&nl.handle).await {
        model.set_mrp(mrp);
    }
    if model.bridge(&args.bridge).is_none() {
        bail!(
            "there is no bridge named {} in this network namespace (see `ip -br link show type bridge`)",
            args.bridge
        );
    }
    for i in membership::libvirt_ports(&args.policy.libvirt_dir(&settings)) {
        model.remember(&i.bridge, &i.dev);
    }
    let plan = planner::plan(&model, &guards);
    for r in &plan.refusals {
        println!("refused: {}", r.reason);
    }
    if plan.actions.is_empty() {
        println!("{}: nothing to repair", args.bridge);
        return Ok(());
    }
    let mut failed = 0;
    let mut applied = Vec::new();
    for action in &plan.actions {
        if args.dry_run {
            println!("would {action}");
            continue;
        }
        match actuator::apply(&nl.handle, action).await {
            Ok(actuator::Applied::Done) => {
                println!("{action}: done");
                applied.push(action);
            }
            Ok(actuator::Applied::Stale(fresh)) => {
                println!("{action}: skipped, {} changed meanwhile", fresh.name);
            }
            Err(e) => {
                failed += 1;
                println!("{}", crate::error_chain(&e));
            }
        }
    }
    if args.dry_run {
        return Ok(());
    }
    // Check the result from the kernel, not from the acks.
    model.reset(
        netlink::dump_consistent(&nl.handle)
            .await
            .context("checking the result")?,
        monotonic_ns(),
    );
    let missing: Vec<String> = applied
        .iter()
        .filter(|a| !a.done(&model))
        .map(ToString::to_string)
        .collect();
    if failed > 0 || !missing.is_empty() {
        bail!(
            "{} repair(s) did not take: {}",
            failed.max(missing.len()),
            missing.join("; ")
        );
    }
    Ok(())
}
