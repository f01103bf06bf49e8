//! Links muffled for a flood of copies (`sources::muffle`), polled instead: their changes come
//! in no notification while the kernel drops them, so each is fetched at the flood's repair
//! pace, after each repair of it, and once when it is released.
//!
//! A poll's answer is the link as it was when the kernel answered. News of the link that came
//! after the poll went out (an eBPF event, a repair's answer) is newer: such an answer is
//! dropped and the link polled again, so a poll never overrides what is newer.

use std::collections::HashMap;

use futures::{StreamExt as _, future::BoxFuture, stream::FuturesUnordered};
use rtnetlink::Handle;
use tokio::time::{Duration, Instant};

use crate::{
    rate::FLOOD_RATE_PER_SEC,
    sources::netlink::{self, LinkSnapshot},
};

/// How often a muffled link is polled: what its notifications would tell comes at most this
/// late. The pace of a fight's repairs during a flood, each also followed by a poll: polled
/// twice as often, the fight cost a third more CPU (3.6-4.2% of a CPU against the bench's
/// fighter, not 2.6-3.0%) for news no repair could act on sooner.
pub const POLL_EVERY: Duration = Duration::from_millis(1000 / FLOOD_RATE_PER_SEC);
/// How long a poll may take before it is abandoned and the link polled again.
const POLL_TIMEOUT: Duration = Duration::from_secs(1);

/// Why a link is polled: it is muffled (`poll`), or was just released (`release`). Names the
/// news a repair is planned on in its log line.
pub type Why = &'static str;

/// A poll's answer: the link, and what came (`None`: gone, or no
/// answer).
pub struct Polled {
    ifindex: u32,
    why: Why,
    link: Option<LinkSnapshot>,
    answered: bool,
}

pub struct Polls {
    handle: Handle,
    /// Muffled links, and when each is polled next.
    due: HashMap<u32, Instant>,
    /// Polls out, by link: whether news of it came since (then its answer is stale).
    asked: HashMap<u32, bool>,
    answers: FuturesUnordered<BoxFuture<'static, Polled>>,
}

impl Polls {
    pub fn new(handle: Handle) -> Self {
        Self {
            handle,
            due: HashMap::new(),
            asked: HashMap::new(),
            answers: FuturesUnordered::new(),
        }
    }

    /// Follows the muffled links: a link newly muffled is polled at once, one released no
    /// longer periodically.
    pub fn follow(&mut self, muffled: impl Iterator<Item = u32>, now: Instant) {
        let muffled: Vec<u32> = muffled.collect();
        self.due.retain(|l, _| muffled.contains(l));
        for l in muffled {
            self.due.entry(l).or_insert(now);
        }
    }

    /// Polls the muffled links that are due.
    pub fn ask_due(&mut self, now: Instant) {
        let due: Vec<u32> = self
            .due
            .iter()
            .filter(|(_, t)| **t <= now)
            .map(|(l, _)| *l)
            .collect();
        for l in due {
            self.ask(l, "poll");
        }
    }

    /// Polls `ifindex` now, unless a poll of it is out.
    pub fn ask(&mut self, ifindex: u32, why: Why) {
        if let Some(t) = self.due.get_mut(&ifindex) {
            *t = Instant::now() + POLL_EVERY;
        }
        if self.asked.contains_key(&ifindex) {
            return;
        }
        self.asked.insert(ifindex, false);
        let handle = self.handle.clone();
        self.answers.push(Box::pin(async move {
            let r =
                tokio::time::timeout(POLL_TIMEOUT, netlink::link_in(&handle, None, ifindex)).await;
            let (link, answered) = match r {
                Ok(Ok(link)) => (link, true),
                Ok(Err(e)) => {
                    tracing::debug!(
                        ifindex,
                        "cannot poll a muffled link: {}",
                        crate::error_chain(&e)
                    );
                    (None, false)
                }
                Err(_) => (None, false),
            };
            Polled {
                ifindex,
                why,
                link,
                answered,
            }
        }));
    }

    /// Whether `ifindex` is muffled: a repair of it is followed by a poll.
    pub fn muffled(&self, ifindex: u32) -> bool {
        self.due.contains_key(&ifindex)
    }

    /// News of `ifindex` from elsewhere: a poll of it out now answers with older news.
    pub fn touched(&mut self, ifindex: u32) {
        if let Some(stale) = self.asked.get_mut(&ifindex) {
            *stale = true;
        }
    }

    /// When the next muffled link is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.due.values().min().copied()
    }

    pub fn is_empty(&self) -> bool {
        self.answers.is_empty()
    }

    /// The next answer; pending while no poll is out.
    pub async fn next(&mut self) -> Option<Polled> {
        self.answers.next().await
    }

    /// What an answer tells: the link as the kernel had it ([`Taken::Fresh`]), unless newer
    /// news came meanwhile (then it is polled again) or none came (gone; or unanswered, and
    /// polled again when next due).
    pub fn take(&mut self, p: Polled) -> Taken {
        let stale = self.asked.remove(&p.ifindex).unwrap_or(false);
        if stale && p.answered {
            self.ask(p.ifindex, p.why);
            return Taken::Stale;
        }
        match p.link {
            Some(l) => Taken::Fresh(l, p.why),
            None => Taken::Nothing(p.ifindex),
        }
    }
}

/// What a poll's answer tells.
pub enum Taken {
    /// The link now.
    Fresh(LinkSnapshot, Why),
    /// Older than news that came meanwhile: polled again.
    Stale,
    /// Nothing, for this link: gone, or no answer in time.
    Nothing(u32),
}
