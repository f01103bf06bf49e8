//! The main thread's side of the measurement: link samples and guard output in arrival order,
//! turned into settled labs and measured outages.

use std::{
    collections::VecDeque,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc::{self, Receiver, RecvTimeoutError, Sender},
    },
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

use super::monitor::{self, Activity, Sample};

/// How a fault ended.
#[derive(Clone, Debug)]
pub enum Outcome {
    /// Healthy again `outage_ns` after the fault was injected.
    Healed { outage_ns: u64 },
    /// Still unhealthy when the timeout came.
    NotHealed { why: String },
    /// The lab never looked unhealthy: the fault did not show in any notification.
    NotObserved,
}

/// One measured fault.
#[derive(Clone, Debug)]
pub struct Measured {
    pub outcome: Outcome,
    /// From injection to the first unhealthy notification.
    pub first_unhealthy_ns: Option<u64>,
    /// Separate unhealthy stretches (more than one: the lab flickered healthy in between).
    pub episodes: u32,
    /// The first problem seen.
    pub first_problem: Option<String>,
    /// Guard output during the measurement.
    pub guard_lines: Vec<String>,
    /// The carrier of the final healthy notification came from a query.
    pub carrier_queried: bool,
    pub overrun: bool,
}

/// The main thread's side: the notifications and guard output, in arrival order, and the lab's
/// health as last reported.
pub struct Observer {
    rx: Receiver<Activity>,
    /// Activity already received by [`Self::peek_until`], handed out again first.
    replay: VecDeque<Activity>,
    tx: Sender<Activity>,
    stop: Arc<AtomicBool>,
    pub last: Option<Sample>,
}

impl Observer {
    /// Starts the notification thread in namespace `ns`, watching `bridge` and VM `ports`, and
    /// returns once its first dump is in.
    pub fn start(ns: &str, bridge: &str, ports: Vec<String>) -> Result<Self> {
        let (tx, rx) = mpsc::channel();
        let stop = monitor::spawn(ns, bridge, ports, tx.clone())?;
        let mut obs = Self {
            rx,
            replay: VecDeque::new(),
            tx,
            stop,
            last: None,
        };
        obs.absorb_pending();
        Ok(obs)
    }

    /// Where guard output goes, so it counts as activity.
    pub fn sender(&self) -> Sender<Activity> {
        self.tx.clone()
    }

    pub fn healthy(&self) -> bool {
        self.last.as_ref().is_some_and(Sample::healthy)
    }

    pub fn problem(&self) -> String {
        self.last
            .as_ref()
            .and_then(|s| s.problem.clone())
            .unwrap_or_else(|| "healthy".to_owned())
    }

    fn recv_timeout(&mut self, timeout: Duration) -> Result<Activity, RecvTimeoutError> {
        match self.replay.pop_front() {
            Some(a) => Ok(a),
            None => self.rx.recv_timeout(timeout),
        }
    }

    fn try_recv(&mut self) -> Result<Activity, mpsc::TryRecvError> {
        match self.replay.pop_front() {
            Some(a) => Ok(a),
            None => self.rx.try_recv(),
        }
    }

    /// Waits up to `timeout` for a notification after which `pred` holds, keeping everything
    /// it receives to be handed out again (so a measurement that follows sees it all). Fails
    /// if none comes: a fault step waits on this for the kernel to have acted.
    pub fn peek_until(&mut self, timeout: Duration, pred: impl Fn(&Sample) -> bool) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(a) => {
                    let hit = matches!(&a, Activity::Link(s) if pred(s));
                    self.replay.push_back(a);
                    if hit {
                        return Ok(());
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    bail!("no link notification showed the expected change within {timeout:?}")
                }
                Err(RecvTimeoutError::Disconnected) => bail!("the link monitor stopped"),
            }
        }
    }

    fn absorb_pending(&mut self) {
        while let Ok(a) = self.try_recv() {
            if let Activity::Link(s) = a {
                self.last = Some(*s);
            }
        }
    }

    /// Waits until the lab is healthy and nothing (no notification, no guard output) has
    /// happened for `quiet`; fails after `timeout`.
    pub fn settle(&mut self, quiet: Duration, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let now = Instant::now();
            if now >= deadline {
                bail!(
                    "the lab did not settle within {timeout:?}: {}",
                    self.problem()
                );
            }
            let wait = if self.healthy() {
                quiet.min(deadline - now)
            } else {
                deadline - now
            };
            match self.recv_timeout(wait) {
                Ok(Activity::Link(s)) => self.last = Some(*s),
                Ok(Activity::Guard { .. }) => {}
                Err(RecvTimeoutError::Timeout) if self.healthy() => return Ok(()),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => bail!("the link monitor stopped"),
            }
        }
    }

    /// Measures a fault injected at `t0` (CLOCK_MONOTONIC): waits until the lab has been
    /// unhealthy and is healthy again with nothing happening for `quiet`, or `timeout` passes.
    /// The outage ends at the notification that made the lab healthy for the last time.
    pub fn measure(&mut self, t0: u64, timeout: Duration, quiet: Duration) -> Result<Measured> {
        self.measure_with(t0, timeout, quiet, &mut |_| {})
    }

    /// As [`Self::measure`], calling `on_sample` with every notification after `t0` (the demo
    /// prints evidence from it).
    pub fn measure_with(
        &mut self,
        t0: u64,
        timeout: Duration,
        quiet: Duration,
        on_sample: &mut dyn FnMut(&Sample),
    ) -> Result<Measured> {
        let start = Instant::now();
        let mut m = Measured {
            outcome: Outcome::NotObserved,
            first_unhealthy_ns: None,
            episodes: 0,
            first_problem: None,
            guard_lines: Vec::new(),
            carrier_queried: false,
            overrun: false,
        };
        let mut healthy = self.healthy();
        let mut healed_at: Option<u64> = None;
        let mut last_activity = Instant::now();
        loop {
            let now = Instant::now();
            let elapsed = now - start;
            let seen = m.episodes > 0;
            if healthy && seen && now - last_activity >= quiet {
                break;
            }
            if elapsed >= timeout && !(healthy && seen) {
                break;
            }
            let wait = if healthy && seen {
                quiet.saturating_sub(now - last_activity)
            } else {
                timeout.saturating_sub(elapsed)
            };
            match self.recv_timeout(wait.max(Duration::from_micros(100))) {
                Ok(Activity::Link(s)) => {
                    last_activity = Instant::now();
                    m.overrun |= s.overrun;
                    let ok = s.healthy();
                    if s.t_ns >= t0 {
                        on_sample(&s);
                        if !ok && healthy {
                            m.episodes += 1;
                            healed_at = None;
                            if m.first_unhealthy_ns.is_none() {
                                m.first_unhealthy_ns = Some(s.t_ns - t0);
                                m.first_problem.clone_from(&s.problem);
                            }
                        } else if ok && !healthy && m.episodes > 0 {
                            healed_at = Some(s.t_ns);
                            m.carrier_queried = s.carrier_queried;
                        }
                    }
                    healthy = ok;
                    self.last = Some(*s);
                }
                Ok(Activity::Guard { line, .. }) => {
                    last_activity = Instant::now();
                    m.guard_lines.push(line);
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => bail!("the link monitor stopped"),
            }
        }
        m.outcome = match (m.episodes, healed_at) {
            (0, _) => Outcome::NotObserved,
            (_, Some(t)) if healthy => Outcome::Healed {
                outage_ns: t.saturating_sub(t0),
            },
            _ => Outcome::NotHealed {
                why: self.problem(),
            },
        };
        Ok(m)
    }

    /// Follows notifications from now on (the lab as last seen at `t_end`) until the lab has
    /// been healthy for `quiet` with nothing happening, or `timeout` passes. With `stp_off`,
    /// healthy also needs kernel STP off on the bridge. Returns how long after `t_end` the lab
    /// became healthy for good (0 if it already was), `None` if it was not by the timeout, and
    /// the guard lines seen meanwhile.
    pub fn healthy_for_good(
        &mut self,
        t_end: u64,
        timeout: Duration,
        quiet: Duration,
        stp_off: bool,
    ) -> Result<(Option<u64>, usize)> {
        let ok = |s: &Sample| {
            s.healthy()
                && (!stp_off
                    || s.view
                        .bridge
                        .as_ref()
                        .is_some_and(|b| b.stp_on == Some(false)))
        };
        let start = Instant::now();
        let mut healthy = self.last.as_ref().is_some_and(ok);
        let mut since = healthy.then_some(t_end);
        let mut last_activity = Instant::now();
        let mut lines = 0;
        loop {
            let now = Instant::now();
            if healthy && now - last_activity >= quiet {
                break;
            }
            if now - start >= timeout {
                break;
            }
            let wait = if healthy {
                quiet.saturating_sub(now - last_activity)
            } else {
                timeout.saturating_sub(now - start)
            };
            match self.recv_timeout(wait.max(Duration::from_micros(100))) {
                Ok(Activity::Link(s)) => {
                    last_activity = Instant::now();
                    let now_ok = ok(&s);
                    if now_ok && !healthy {
                        since = Some(s.t_ns);
                    }
                    healthy = now_ok;
                    self.last = Some(*s);
                }
                Ok(Activity::Guard { .. }) => {
                    last_activity = Instant::now();
                    lines += 1;
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => bail!("the link monitor stopped"),
            }
        }
        let after = since.filter(|_| healthy).map(|t| t.saturating_sub(t_end));
        Ok((after, lines))
    }

    /// Waits up to `timeout` for a notification after which `pred` holds; that sample, or
    /// `None` if none came.
    pub fn wait_for(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&Sample) -> bool,
    ) -> Result<Option<Sample>> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            match self.recv_timeout(left) {
                Ok(Activity::Link(s)) => {
                    let hit = pred(&s);
                    self.last = Some(*s);
                    if hit {
                        return Ok(self.last.clone());
                    }
                }
                Ok(Activity::Guard { .. }) => {}
                Err(RecvTimeoutError::Timeout) => return Ok(None),
                Err(RecvTimeoutError::Disconnected) => bail!("the link monitor stopped"),
            }
        }
    }

    /// Takes every notification and line of guard output until `until`: how many guard lines
    /// came.
    pub fn count_guard_lines_until(&mut self, until: Instant) -> Result<usize> {
        let mut lines = 0;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(lines);
            }
            match self.recv_timeout(left) {
                Ok(Activity::Link(s)) => self.last = Some(*s),
                Ok(Activity::Guard { .. }) => lines += 1,
                Err(RecvTimeoutError::Timeout) => return Ok(lines),
                Err(RecvTimeoutError::Disconnected) => bail!("the link monitor stopped"),
            }
        }
    }

    /// Waits up to `timeout` for a line of guard output; whether one came.
    pub fn wait_guard_line(&mut self, timeout: Duration) -> Result<bool> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv_timeout(left) {
                Ok(Activity::Link(s)) => self.last = Some(*s),
                Ok(Activity::Guard { .. }) => return Ok(true),
                Err(RecvTimeoutError::Timeout) => return Ok(false),
                Err(RecvTimeoutError::Disconnected) => bail!("the link monitor stopped"),
            }
        }
    }

    /// Takes every guard line that arrived so far (and the latest lab state) without waiting.
    pub fn drain_guard_lines(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(a) = self.try_recv() {
            match a {
                Activity::Link(s) => self.last = Some(*s),
                Activity::Guard { line, .. } => out.push(line),
            }
        }
        out
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
