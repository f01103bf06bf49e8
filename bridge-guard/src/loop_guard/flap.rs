//! MAC-flap reports from the `br_fdb_update` program (`FDB_EVENTS`), read asynchronously.

use aya::{
    Ebpf,
    maps::{MapData, PerCpuArray, RingBuf},
};
use bridge_guard_common::{FdbFlap, fdb};
use tokio::io::unix::AsyncFd;

use crate::sources::ebpf::EbpfError;

/// One address flapping between two ports, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flap {
    pub ktime_ns: u64,
    pub bridge_ifindex: u32,
    pub port_ifindex: u32,
    pub prev_ifindex: u32,
    pub moves: u32,
    pub vid: u16,
    pub mac: [u8; 6],
}

impl Flap {
    /// Decodes one record; `None` if it is short.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < FdbFlap::SIZE {
            return None;
        }
        // SAFETY: the length is checked; `FdbFlap` is plain old data and `read_unaligned`
        // makes no alignment assumption.
        let raw = unsafe { bytes.as_ptr().cast::<FdbFlap>().read_unaligned() };
        Some(Self {
            ktime_ns: raw.ktime_ns,
            bridge_ifindex: raw.bridge_ifindex,
            port_ifindex: raw.port_ifindex,
            prev_ifindex: raw.prev_ifindex,
            moves: raw.moves,
            vid: raw.vid,
            mac: raw.mac,
        })
    }
}

pub struct FlapStream {
    ring: AsyncFd<RingBuf<MapData>>,
    counters: PerCpuArray<MapData, u64>,
}

impl FlapStream {
    pub(crate) fn new(ebpf: &mut Ebpf) -> Result<Self, EbpfError> {
        let ring = ebpf
            .take_map("FDB_EVENTS")
            .ok_or(EbpfError::MissingMap("FDB_EVENTS"))?;
        let ring = RingBuf::try_from(ring).map_err(|source| EbpfError::Map {
            name: "FDB_EVENTS",
            source,
        })?;
        let counters = ebpf
            .take_map("FDB_COUNTERS")
            .ok_or(EbpfError::MissingMap("FDB_COUNTERS"))?;
        let counters = PerCpuArray::try_from(counters).map_err(|source| EbpfError::Map {
            name: "FDB_COUNTERS",
            source,
        })?;
        // SAFETY: the RingBuf owns its map fd and keeps it open until dropped with the AsyncFd.
        let ring = unsafe { AsyncFd::register(ring) }.map_err(|e| EbpfError::Poll(e.into()))?;
        Ok(Self { ring, counters })
    }

    /// Waits for reports and appends every one available to `out`.
    pub async fn recv(&mut self, out: &mut Vec<Flap>) -> std::io::Result<()> {
        let mut guard = self.ring.readable_mut().await?;
        let ring = guard.get_inner_mut();
        while let Some(record) = ring.next() {
            out.extend(Flap::decode(&record));
        }
        guard.clear_ready();
        Ok(())
    }

    /// Appends every report available now to `out`.
    pub fn drain(&mut self, out: &mut Vec<Flap>) {
        let ring = self.ring.get_mut();
        while let Some(record) = ring.next() {
            out.extend(Flap::decode(&record));
        }
    }

    /// `(reports lost, updates not judged)` so far, summed over CPUs.
    pub fn counters(&self) -> (u64, u64) {
        let get = |i: u32| {
            self.counters
                .get(&i, 0)
                .map(|per_cpu| per_cpu.iter().sum())
                .unwrap_or(0)
        };
        (get(fdb::counter::LOST), get(fdb::counter::READ_FAILED))
    }
}
