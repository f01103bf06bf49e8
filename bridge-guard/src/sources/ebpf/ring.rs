//! The ring buffer, read asynchronously: woken by epoll when the kernel submits, drained in
//! batches.

use aya::{
    Ebpf,
    maps::{MapData, PerCpuArray, RingBuf},
};
use tokio::io::unix::AsyncFd;

use super::EbpfError;
use crate::event::{DecodeError, KernelEvent};

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

    /// Waits for records and appends every one available to `out`.
    pub async fn next_batch(
        &mut self,
        out: &mut Vec<Result<KernelEvent, DecodeError>>,
    ) -> std::io::Result<()> {
        let mut guard = self.ring.readable_mut().await?;
        let ring = guard.get_inner_mut();
        while let Some(record) = ring.next() {
            out.push(KernelEvent::decode(&record));
        }
        guard.clear_ready();
        Ok(())
    }

    /// Appends every record available now to `out`, without waiting.
    pub fn drain(&mut self, out: &mut Vec<Result<KernelEvent, DecodeError>>) {
        let ring = self.ring.get_mut();
        while let Some(record) = ring.next() {
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
