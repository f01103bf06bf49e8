//! A lab with its observer: what every mode starts from, and how a contender is started on it.

use std::{path::Path, time::Duration};

use anyhow::Result;

use super::{
    contenders::{Contender, Running},
    faults::{self, BenchLab},
    observer::Observer,
};
use crate::lab::TempDir;

/// How long the lab may take to settle before the bench gives up.
const SETTLE: Duration = Duration::from_secs(30);

pub struct WatchedLab {
    pub lab: BenchLab,
    pub obs: Observer,
    /// The ports health is judged by: the VMs', and any `extra` added.
    pub ports: Vec<String>,
    quiet: Duration,
}

impl WatchedLab {
    /// A lab of `vms` VMs, restored (STP off, every port forwarding); `extra` may add links to
    /// it and returns the ports it added to the bridge. Returns once the observer has seen the
    /// lab healthy and quiet for `quiet`.
    pub fn new(
        tag: &str,
        vms: usize,
        quiet: Duration,
        extra: impl FnOnce(&BenchLab) -> Result<Vec<String>>,
    ) -> Result<Self> {
        let mut lab = BenchLab::new("bgb", tag, vms)?;
        faults::restore(&mut lab, false)?;
        let mut ports = lab.lab.ports();
        ports.extend(extra(&lab)?);
        let mut obs = Observer::start(&lab.lab.host.name, lab.bridge(), ports.clone())?;
        obs.settle(quiet, SETTLE)?;
        Ok(Self {
            lab,
            obs,
            ports,
            quiet,
        })
    }

    /// The bench's own repair, then a wait until the lab is healthy and quiet.
    pub fn restore(&mut self) -> Result<()> {
        faults::restore(&mut self.lab, false)?;
        self.obs.settle(self.quiet, SETTLE)
    }

    /// Starts contender `c` (the agent is `bin` with `extra` arguments) and returns once it is
    /// ready and the lab healthy and quiet.
    pub fn start(
        &mut self,
        c: Contender,
        (bin, extra): (&Path, &[String]),
        tmp: &TempDir,
    ) -> Result<Running> {
        let running = Running::start(
            c,
            (&self.lab.lab.host, &self.lab.lab.bridge, &self.ports),
            (bin, extra),
            &mut self.obs,
            &mut self.lab.host,
            tmp,
        )?;
        if !self.obs.healthy() {
            faults::restore(&mut self.lab, false)?;
        }
        self.obs.settle(self.quiet, SETTLE)?;
        Ok(running)
    }
}
