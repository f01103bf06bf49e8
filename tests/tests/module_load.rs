//! Where bridge is a module (distribution kernels), the agent may start before it is loaded;
//! the first bridge created loads it, and the agent must then attach its kprobe/fentry hooks.
//! Alone in this file because it unloads the module: no other lab may run meanwhile.

use std::{process::Command, time::Duration};

use integration_tests::{Agent, Need, NetNs, PREFIX, skip, skip_unless_root};

/// `Some(true)`: a loaded module; `Some(false)`: not loaded; `None`: built in.
fn bridge_module_state() -> anyhow::Result<Option<bool>> {
    let kallsyms = std::fs::read_to_string("/proc/kallsyms")?;
    let line = kallsyms
        .lines()
        .find(|l| l.split_whitespace().nth(2) == Some("br_set_state"));
    Ok(match line {
        Some(l) if l.contains("[bridge]") => Some(true),
        Some(_) => None,
        None => Some(false),
    })
}

#[test]
fn hooks_attach_when_the_bridge_module_loads_after_the_agent_started() -> anyhow::Result<()> {
    let test = "hooks_attach_when_the_bridge_module_loads_after_the_agent_started";
    if skip_unless_root(test) {
        return Ok(());
    }
    match bridge_module_state()? {
        None => {
            skip(
                test,
                Need::BridgeModule,
                "bridge is built into this kernel (CONFIG_BRIDGE=y); `cargo xtask vmtest` covers it on Debian kernels",
            );
            return Ok(());
        }
        Some(true) => {
            let out = Command::new("rmmod").arg("bridge").output()?;
            if !out.status.success() {
                skip(
                    test,
                    Need::BridgeModule,
                    format_args!(
                        "bridge.ko is loaded and cannot be unloaded ({})",
                        String::from_utf8_lossy(&out.stderr).trim()
                    ),
                );
                return Ok(());
            }
        }
        Some(false) => {}
    }
    let lab = NetNs::new(PREFIX, "modload")?;
    let mut agent = Agent::run(&lab, &["--bridge", "br0", "--observe"])?;
    assert!(
        !agent.ready.contains("port-state=kprobe"),
        "{}",
        agent.ready
    );
    // Creating the first bridge loads the module.
    lab.stp_bridge("br0")?;
    let line = agent.wait_log("the re-attach", Duration::from_secs(30), |l| {
        l.contains("bridge module loaded")
    })?;
    assert!(
        line.contains("port-state now kprobe") || line.contains("port-state now fentry"),
        "{line}"
    );
    // Events now come from the kernel hooks, stamped by the kernel's clock.
    lab.veth_port("br0", "vnet0", "guest0")?;
    agent.wait_log(
        "a kernel-stamped transition",
        Duration::from_secs(30),
        |l| l.contains("port=vnet0") && l.contains("clock=Kernel"),
    )?;
    Ok(())
}
