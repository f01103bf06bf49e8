//! The ring buffer, read asynchronously: woken by epoll when the kernel submits, drained in
//! batches.

use aya::{
    Ebpf,
    maps::{MapData, PerCpuArray, RingBuf},
};
use tokio::io::unix::AsyncFd;

use super::EbpfError;
use crate::event::{DecodeError, KernelEvent};

/// Records read per turn: bounded, so that a flood leaves the other sources their turn.
pub const BATCH: usize = 4096;

pub struct EventStream {
    ring: AsyncFd<RingBuf<MapData>>,
    lost: PerCpuArray<MapData, u64>,
}

impl EventStream {
    pub(super) fn new(ebpf: &mut Ebpf) -> Result<Self, EbpfError> {
        let map = |name: &'static str, ebpf: &mut Ebpf| {
            ebpf.take_map(name).ok_or(EbpfError::MissingMap(name))
        };
        let ring = RingBuf::try_from(map("EVENTS", ebpf)?).map_err(|source| EbpfError::Map {
            name: "EVENTS",
            source,
        })?;
        let lost = PerCpuArray::try_from(map("LOST", ebpf)?).map_err(|source| EbpfError::Map {
            name: "LOST",
            source,
        })?;
        // SAFETY: the RingBuf owns its map fd and keeps it open, unchanged, until it is dropped
        // together with the AsyncFd.
        let ring = unsafe { AsyncFd::register(ring) }.map_err(|e| EbpfError::Poll(e.into()))?;
        Ok(Self { ring, lost })
    }

    /// Waits for records and appends those available to `out`, up to `max` in all.
    pub async fn next_batch(
        &mut self,
        out: &mut Vec<Result<KernelEvent, DecodeError>>,
        max: usize,
    ) -> std::io::Result<()> {
        let mut guard = self.ring.readable_mut().await?;
        let ring = guard.get_inner_mut();
        while out.len() < max {
            let Some(record) = ring.next() else {
                // Empty: wait for the next submission. Left ready otherwise, so what is left
                // is read on the next turn, after the other sources had theirs.
                guard.clear_ready();
                break;
            };
            out.push(KernelEvent::decode(&record));
        }
        Ok(())
    }

    /// Appends the records available now to `out`, up to `max` in all, without waiting.
    pub fn drain(&mut self, out: &mut Vec<Result<KernelEvent, DecodeError>>, max: usize) {
        let ring = self.ring.get_mut();
        while out.len() < max {
            let Some(record) = ring.next() else { break };
            out.push(KernelEvent::decode(&record));
        }
    }

    /// Events the kernel could not write because the buffer was full, summed over CPUs.
    pub fn lost(&self) -> u64 {
        self.lost
            .get(&0, 0)
            .map(|per_cpu| per_cpu.iter().sum())
            .unwrap_or(0)
    }
}
