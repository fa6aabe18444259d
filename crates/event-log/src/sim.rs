//! A simulated disk for power-loss tests: unsynced writes live in a volatile layer that a
//! "power cut" drops, keeps, keeps page by page, or tears.
//!
//! Model (strict, stricter than ext4 with `data=ordered`):
//! - file bytes become durable only at that file's `sync_data`;
//! - a create, rename or remove becomes durable only at `sync_dir` of its directory;
//! - at a cut, each file keeps its durable bytes plus one of: none of its unsynced writes, all of
//!   them, any subset of their 4 KiB pages, or all but a torn last write; the directory keeps
//!   its durable entries plus a random prefix of the unsynced entry changes, so a file whose
//!   entry was never synced may vanish.
//!
//! Cut points are counted in mutating operations (write, set_len, sync, create, rename, remove,
//! directory sync): [`SimVfs::cut_power_at`] makes operation number `n` fail and every later one
//! too, as if the machine had stopped right before it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::vfs::{Vfs, VfsFile};

/// The page size the simulation tears writes at.
pub const SIM_PAGE_BYTES: u64 = 4096;

#[derive(Debug, Clone)]
enum FileOp {
    Write { offset: u64, data: Vec<u8> },
    SetLen(u64),
}

#[derive(Debug, Default, Clone)]
struct Inode {
    current: Vec<u8>,
    durable: Vec<u8>,
    pending: Vec<FileOp>,
}

#[derive(Debug, Clone)]
enum DirOp {
    Link { path: PathBuf, inode: u64 },
    Unlink { path: PathBuf },
    Rename { from: PathBuf, to: PathBuf },
}

impl DirOp {
    fn dir(&self) -> Option<&Path> {
        match self {
            DirOp::Link { path, .. } | DirOp::Unlink { path } => path.parent(),
            DirOp::Rename { to, .. } => to.parent(),
        }
    }
    fn apply(&self, names: &mut BTreeMap<PathBuf, u64>) {
        match self {
            DirOp::Link { path, inode } => {
                names.insert(path.clone(), *inode);
            }
            DirOp::Unlink { path } => {
                names.remove(path);
            }
            DirOp::Rename { from, to } => {
                if let Some(inode) = names.remove(from) {
                    names.insert(to.clone(), inode);
                }
            }
        }
    }
}

#[derive(Debug, Default)]
struct State {
    inodes: HashMap<u64, Inode>,
    names: BTreeMap<PathBuf, u64>,
    durable_names: BTreeMap<PathBuf, u64>,
    pending_dir_ops: Vec<DirOp>,
    dirs: BTreeSet<PathBuf>,
    next_inode: u64,
    ops: u64,
    cut_at: Option<u64>,
    dead: bool,
    write_bytes: u64,
    syncs: u64,
}

impl State {
    fn tick(&mut self) -> io::Result<()> {
        if self.dead {
            return Err(power_off());
        }
        self.ops += 1;
        if self.cut_at == Some(self.ops) {
            self.dead = true;
            return Err(power_off());
        }
        Ok(())
    }
    fn alive(&self) -> io::Result<()> {
        if self.dead { Err(power_off()) } else { Ok(()) }
    }
}

fn power_off() -> io::Error {
    io::Error::other("simulated power cut")
}

/// A simulated disk. Cheap to clone; clones share the same disk.
#[derive(Debug, Clone, Default)]
pub struct SimVfs {
    state: Arc<Mutex<State>>,
}

/// A small deterministic generator (SplitMix64) for the power-cut choices.
#[derive(Debug, Clone)]
pub struct SimRng(u64);

impl SimRng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// A number in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

fn apply_op(buf: &mut Vec<u8>, op: &FileOp) {
    match op {
        FileOp::Write { offset, data } => write_into(buf, *offset, data),
        FileOp::SetLen(len) => buf.resize(*len as usize, 0),
    }
}

fn write_into(buf: &mut Vec<u8>, offset: u64, data: &[u8]) {
    let end = offset as usize + data.len();
    if buf.len() < end {
        buf.resize(end, 0);
    }
    buf[offset as usize..end].copy_from_slice(data);
}

impl SimVfs {
    /// An empty disk.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Mutating operations performed so far.
    pub fn ops(&self) -> u64 {
        self.lock().ops
    }

    /// Bytes handed to `write` so far, and `sync_data` calls so far.
    pub fn io_counts(&self) -> (u64, u64) {
        let state = self.lock();
        (state.write_bytes, state.syncs)
    }

    /// Arms a power cut: mutating operation number `op` (counted from the disk's creation)
    /// fails, and so does everything after it.
    pub fn cut_power_at(&self, op: u64) {
        self.lock().cut_at = Some(op);
    }

    /// Cuts the power now.
    pub fn cut_power_now(&self) {
        self.lock().dead = true;
    }

    /// Whether the power has been cut.
    pub fn is_dead(&self) -> bool {
        self.lock().dead
    }

    /// The disk as it would be found after a reboot: a new, powered disk holding the durable
    /// state plus a random part of what was not synced (see the module docs).
    pub fn after_power_cut(&self, rng: &mut SimRng) -> SimVfs {
        let state = self.lock();
        let mut names = state.durable_names.clone();
        let keep_dir_ops = rng.below(state.pending_dir_ops.len() as u64 + 1) as usize;
        for op in &state.pending_dir_ops[..keep_dir_ops] {
            op.apply(&mut names);
        }
        let mut inodes = HashMap::new();
        for &inode in names.values() {
            if inodes.contains_key(&inode) {
                continue;
            }
            let Some(file) = state.inodes.get(&inode) else { continue };
            let mut bytes = file.durable.clone();
            match rng.below(4) {
                0 => {}
                1 => file.pending.iter().for_each(|op| apply_op(&mut bytes, op)),
                2 => {
                    for op in &file.pending {
                        match op {
                            FileOp::SetLen(_) => {
                                if rng.below(2) == 0 {
                                    apply_op(&mut bytes, op);
                                }
                            }
                            FileOp::Write { offset, data } => {
                                // Keep a random subset of the pages this write touched.
                                let mut at = *offset;
                                let end = offset + data.len() as u64;
                                while at < end {
                                    let page_end = ((at / SIM_PAGE_BYTES) + 1) * SIM_PAGE_BYTES;
                                    let piece_end = page_end.min(end);
                                    if rng.below(2) == 0 {
                                        let from = (at - offset) as usize;
                                        let to = (piece_end - offset) as usize;
                                        write_into(&mut bytes, at, &data[from..to]);
                                    }
                                    at = piece_end;
                                }
                            }
                        }
                    }
                }
                _ => {
                    let last = file.pending.len().saturating_sub(1);
                    for (i, op) in file.pending.iter().enumerate() {
                        match op {
                            FileOp::Write { offset, data } if i == last => {
                                let keep = rng.below(data.len() as u64 + 1) as usize;
                                write_into(&mut bytes, *offset, &data[..keep]);
                            }
                            _ => apply_op(&mut bytes, op),
                        }
                    }
                }
            }
            inodes.insert(inode, Inode { current: bytes.clone(), durable: bytes, pending: vec![] });
        }
        let next_inode = state.next_inode;
        let dirs = state.dirs.clone();
        drop(state);
        SimVfs {
            state: Arc::new(Mutex::new(State {
                inodes,
                durable_names: names.clone(),
                names,
                dirs,
                next_inode,
                ..State::default()
            })),
        }
    }

    /// XORs one byte of a file, durably (a bit flip on the medium, or tampering).
    pub fn corrupt_byte(&self, path: &Path, offset: u64, mask: u8) -> io::Result<()> {
        let mut state = self.lock();
        let inode = *state.names.get(path).ok_or_else(not_found)?;
        let file = state.inodes.get_mut(&inode).ok_or_else(not_found)?;
        for buf in [&mut file.current, &mut file.durable] {
            if let Some(b) = buf.get_mut(offset as usize) {
                *b ^= mask;
            }
        }
        Ok(())
    }

    /// Cuts a file to `len_bytes`, durably (a truncated copy).
    pub fn truncate_durably(&self, path: &Path, len_bytes: u64) -> io::Result<()> {
        let mut state = self.lock();
        let inode = *state.names.get(path).ok_or_else(not_found)?;
        let file = state.inodes.get_mut(&inode).ok_or_else(not_found)?;
        file.current.truncate(len_bytes as usize);
        file.durable.truncate(len_bytes as usize);
        Ok(())
    }

    /// A copy of a file's current bytes.
    pub fn read_file(&self, path: &Path) -> io::Result<Vec<u8>> {
        let state = self.lock();
        let inode = state.names.get(path).ok_or_else(not_found)?;
        Ok(state.inodes[inode].current.clone())
    }
}

fn not_found() -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, "no such simulated file")
}

#[derive(Debug)]
struct SimFile {
    vfs: SimVfs,
    inode: u64,
}

impl VfsFile for SimFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let state = self.vfs.lock();
        state.alive()?;
        let data = &state.inodes[&self.inode].current;
        let start = (offset as usize).min(data.len());
        let n = buf.len().min(data.len() - start);
        buf[..n].copy_from_slice(&data[start..start + n]);
        Ok(n)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut state = self.vfs.lock();
        state.tick()?;
        state.write_bytes += buf.len() as u64;
        let file = state.inodes.get_mut(&self.inode).expect("inode of an open file");
        write_into(&mut file.current, offset, buf);
        file.pending.push(FileOp::Write { offset, data: buf.to_vec() });
        Ok(())
    }
    fn sync_data(&self) -> io::Result<()> {
        let mut state = self.vfs.lock();
        state.tick()?;
        state.syncs += 1;
        let file = state.inodes.get_mut(&self.inode).expect("inode of an open file");
        for op in std::mem::take(&mut file.pending) {
            apply_op(&mut file.durable, &op);
        }
        Ok(())
    }
    fn set_len(&self, len_bytes: u64) -> io::Result<()> {
        let mut state = self.vfs.lock();
        state.tick()?;
        let file = state.inodes.get_mut(&self.inode).expect("inode of an open file");
        file.current.resize(len_bytes as usize, 0);
        file.pending.push(FileOp::SetLen(len_bytes));
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        let state = self.vfs.lock();
        state.alive()?;
        Ok(state.inodes[&self.inode].current.len() as u64)
    }
}

impl Vfs for SimVfs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        let mut state = self.lock();
        state.alive()?;
        // Directories are created durably: the log makes its directory once, at first open.
        state.dirs.insert(dir.to_path_buf());
        Ok(())
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let state = self.lock();
        state.alive()?;
        if !state.dirs.contains(dir) {
            return Err(not_found());
        }
        Ok(state
            .names
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| p.file_name()?.to_str().map(str::to_owned))
            .collect())
    }
    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn VfsFile>> {
        let mut state = self.lock();
        let inode = match state.names.get(path) {
            Some(&inode) => {
                state.alive()?;
                inode
            }
            None if create => {
                state.tick()?;
                let inode = state.next_inode;
                state.next_inode += 1;
                state.inodes.insert(inode, Inode::default());
                state.names.insert(path.to_path_buf(), inode);
                state.pending_dir_ops.push(DirOp::Link { path: path.to_path_buf(), inode });
                inode
            }
            None => return Err(not_found()),
        };
        drop(state);
        Ok(Arc::new(SimFile { vfs: self.clone(), inode }))
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        let mut state = self.lock();
        state.tick()?;
        state.names.remove(path).ok_or_else(not_found)?;
        state.pending_dir_ops.push(DirOp::Unlink { path: path.to_path_buf() });
        Ok(())
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut state = self.lock();
        state.tick()?;
        let inode = state.names.remove(from).ok_or_else(not_found)?;
        state.names.insert(to.to_path_buf(), inode);
        state
            .pending_dir_ops
            .push(DirOp::Rename { from: from.to_path_buf(), to: to.to_path_buf() });
        Ok(())
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut state = self.lock();
        state.tick()?;
        let pending = std::mem::take(&mut state.pending_dir_ops);
        let (now, later): (Vec<_>, Vec<_>) =
            pending.into_iter().partition(|op| op.dir() == Some(dir));
        for op in &now {
            op.apply(&mut state.durable_names);
        }
        state.pending_dir_ops = later;
        Ok(())
    }
    fn exists(&self, path: &Path) -> io::Result<bool> {
        let state = self.lock();
        state.alive()?;
        Ok(state.names.contains_key(path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsynced_file_may_vanish_and_synced_one_stays() {
        let dir = Path::new("/d");
        let mut vanished = 0;
        for seed in 0..64 {
            let vfs = SimVfs::new();
            vfs.create_dir_all(dir).unwrap();
            let a = vfs.open(&dir.join("a"), true).unwrap();
            a.write_all_at(b"durable", 0).unwrap();
            a.sync_data().unwrap();
            vfs.sync_dir(dir).unwrap();
            let b = vfs.open(&dir.join("b"), true).unwrap();
            b.write_all_at(b"volatile", 0).unwrap();
            b.sync_data().unwrap();
            a.write_all_at(b"XX", 0).unwrap();
            let after = vfs.after_power_cut(&mut SimRng::new(seed));
            let bytes = after.read_file(&dir.join("a")).unwrap();
            assert!(bytes == b"durable" || bytes == b"XXrable" || bytes == b"Xurable");
            if !after.exists(&dir.join("b")).unwrap() {
                vanished += 1;
            }
        }
        assert!(vanished > 0 && vanished < 64, "vanished {vanished} of 64");
    }

    #[test]
    fn cut_point_stops_everything_after_it() {
        let vfs = SimVfs::new();
        vfs.create_dir_all(Path::new("/d")).unwrap();
        let f = vfs.open(Path::new("/d/f"), true).unwrap();
        vfs.cut_power_at(vfs.ops() + 2);
        f.write_all_at(b"one", 0).unwrap();
        assert!(f.sync_data().is_err());
        assert!(f.write_all_at(b"two", 3).is_err());
        assert!(vfs.is_dead());
    }
}
