//! [`CrashDisk`]: an in-memory redb backend that loses every write not yet synced when it
//! "crashes", as a power cut would. The simulation runs [`super::RedbStore`] on it.

use std::sync::{Arc, Mutex, MutexGuard};

use redb::StorageBackend;

/// How to undo one write or resize: the length before it, and the bytes it replaced.
#[derive(Debug)]
struct Undo {
    old_len: usize,
    offset: usize,
    old_bytes: Vec<u8>,
}

#[derive(Debug, Default)]
struct Disk {
    data: Vec<u8>,
    /// Mutations since the last `sync_data`, oldest first.
    unsynced: Vec<Undo>,
    syncs: u64,
    /// Bumped by every crash; handles from before a crash can no longer touch the device.
    epoch: u64,
}

/// A simulated disk. Clones share the same bytes (the "device"); [`CrashDisk::crash`] rolls
/// back everything written since the last sync, and from then on every handle attached before
/// the crash fails all I/O (the process that held it is gone: whatever its drop would write
/// never reaches the device). [`CrashDisk::attach`] gives a handle for the restarted process.
#[derive(Debug, Clone, Default)]
pub struct CrashDisk {
    disk: Arc<Mutex<Disk>>,
    epoch: u64,
}

impl CrashDisk {
    /// An empty disk.
    pub fn new() -> Self {
        Self::default()
    }

    /// A handle for a process started now (valid until the next crash).
    pub fn attach(&self) -> Self {
        Self { disk: Arc::clone(&self.disk), epoch: self.lock().epoch }
    }

    /// Loses every write since the last sync and cuts off every attached handle.
    pub fn crash(&self) {
        let mut disk = self.lock();
        disk.epoch += 1;
        let unsynced = std::mem::take(&mut disk.unsynced);
        for undo in unsynced.into_iter().rev() {
            let end = undo.offset + undo.old_bytes.len();
            if disk.data.len() < end {
                disk.data.resize(end, 0);
            }
            disk.data[undo.offset..end].copy_from_slice(&undo.old_bytes);
            disk.data.resize(undo.old_len, 0);
        }
    }

    /// Syncs so far.
    pub fn syncs(&self) -> u64 {
        self.lock().syncs
    }

    fn lock(&self) -> MutexGuard<'_, Disk> {
        self.disk.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The device, if this handle was attached since the last crash.
    fn live(&self) -> Result<MutexGuard<'_, Disk>, std::io::Error> {
        let disk = self.lock();
        if disk.epoch != self.epoch {
            return Err(std::io::Error::other("disk crashed under this handle"));
        }
        Ok(disk)
    }
}

fn out_of_range() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, "offset out of range")
}

impl StorageBackend for CrashDisk {
    fn len(&self) -> Result<u64, std::io::Error> {
        Ok(self.live()?.data.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
        let disk = self.live()?;
        let offset = usize::try_from(offset).map_err(|_| out_of_range())?;
        let source = disk.data.get(offset..offset + out.len()).ok_or_else(out_of_range)?;
        out.copy_from_slice(source);
        Ok(())
    }

    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        let mut disk = self.live()?;
        let len = usize::try_from(len).map_err(|_| out_of_range())?;
        let old_len = disk.data.len();
        let offset = len.min(old_len);
        let old_bytes = disk.data[offset..].to_vec();
        disk.unsynced.push(Undo { old_len, offset, old_bytes });
        disk.data.resize(len, 0);
        Ok(())
    }

    fn sync_data(&self) -> Result<(), std::io::Error> {
        let mut disk = self.live()?;
        disk.unsynced.clear();
        disk.syncs += 1;
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        let mut disk = self.live()?;
        let offset = usize::try_from(offset).map_err(|_| out_of_range())?;
        let old_len = disk.data.len();
        let end = offset + data.len();
        let old_bytes = disk.data[offset.min(old_len)..end.min(old_len)].to_vec();
        disk.unsynced.push(Undo { old_len, offset: offset.min(old_len), old_bytes });
        if disk.data.len() < end {
            disk.data.resize(end, 0);
        }
        disk.data[offset..end].copy_from_slice(data);
        Ok(())
    }
}

impl super::WalFile for CrashDisk {
    fn len_bytes(&self) -> std::io::Result<u64> {
        StorageBackend::len(self)
    }
    fn read_at(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        StorageBackend::read(self, offset, out)
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        StorageBackend::write(self, offset, data)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        StorageBackend::sync_data(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_crash_loses_exactly_the_unsynced_writes() {
        let disk = CrashDisk::new();
        disk.write(0, b"hello").unwrap();
        disk.sync_data().unwrap();
        disk.write(3, b"LOWORLD").unwrap();
        disk.set_len(4).unwrap();
        disk.set_len(12).unwrap();
        disk.crash();
        assert!(disk.read(0, &mut [0; 1]).is_err(), "the old handle is cut off");
        let disk = disk.attach();
        let mut out = vec![0; 5];
        disk.read(0, &mut out).unwrap();
        assert_eq!(&out, b"hello");
        assert_eq!(disk.len().unwrap(), 5);
        assert_eq!(disk.syncs(), 1);
    }

    #[test]
    fn redb_store_on_a_crashing_disk_keeps_what_it_acknowledged() {
        use crate::storage::{LogStore, RedbStore, WriteBatch};
        use raft::Storage;
        use raft::prelude::Entry;
        let disk = CrashDisk::new();
        let mut store = RedbStore::open_with_backend(disk.attach()).unwrap();
        let entries: Vec<Entry> =
            (1..=3).map(|index| Entry { index, term: 1, ..Entry::default() }).collect();
        store.write(WriteBatch { entries: &entries, ..WriteBatch::default() }).unwrap();
        assert!(disk.syncs() > 0, "redb syncs on a durable commit");
        disk.crash();
        drop(store);
        let store = RedbStore::open_with_backend(disk.attach()).unwrap();
        assert_eq!(store.last_index().unwrap(), 3);
    }
}
