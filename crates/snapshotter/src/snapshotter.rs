//! [`Snapshotter`]: saving, rotating and loading snapshots, the policy loop, and recovery.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use event_log::vfs::{StdVfs, Vfs};
use event_log::{Event, EventLog, GENESIS_HASH, Hash};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::{info, warn};

use crate::error::{Error, Result, io, log_error};
use crate::format::{
    Codec, SNAPSHOT_HEADER_BYTES, SnapshotHeader, parse_file, parse_snapshot_name, snapshot_name,
};
use crate::policy::SnapshotPolicy;

/// Default number of snapshot files kept.
pub const DEFAULT_COPIES: usize = 3;
/// Default number of events kept in the log below the newest snapshot when compacting.
pub const DEFAULT_KEEP_TAIL_EVENTS: u64 = 1_000;
/// Default largest encoded snapshot.
pub const DEFAULT_MAX_SNAPSHOT_BYTES: u64 = 256 * 1024 * 1024;
/// Events read from the log per replay step.
const REPLAY_CHUNK_EVENTS: usize = 4096;
/// Suffix of a snapshot being written.
const TEMP_SUFFIX: &str = ".tmp";

/// A state that can be rebuilt from events.
pub trait Recover {
    /// Applies one event (in log order, each exactly once after the snapshot's position).
    fn apply(&mut self, event: &Event);
}

/// A point in the log: a position and the chain hash there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogPoint {
    /// The position (0: before the first event).
    pub position: u64,
    /// The chain hash of the event at `position`.
    pub hash: Hash,
}

impl From<event_log::Appended> for LogPoint {
    fn from(a: event_log::Appended) -> Self {
        Self { position: a.position, hash: a.hash }
    }
}

/// Options of a [`Snapshotter`].
#[derive(Debug, Clone)]
pub struct SnapshotOptions {
    /// Snapshot files kept (rotating), at least 1.
    pub copies: usize,
    /// Codec for new snapshots (loading reads either).
    pub codec: Codec,
    /// When [`Snapshotter::maybe_snapshot`] takes one.
    pub policy: SnapshotPolicy,
    /// Compact the log below a new durable snapshot.
    pub compact: bool,
    /// Events kept in the log below the snapshot position when compacting.
    pub keep_tail_events: u64,
    /// Largest encoded snapshot accepted.
    pub max_snapshot_bytes: u64,
}

impl Default for SnapshotOptions {
    fn default() -> Self {
        Self {
            copies: DEFAULT_COPIES,
            codec: Codec::Postcard,
            policy: SnapshotPolicy::default(),
            compact: true,
            keep_tail_events: DEFAULT_KEEP_TAIL_EVENTS,
            max_snapshot_bytes: DEFAULT_MAX_SNAPSHOT_BYTES,
        }
    }
}

/// A snapshot on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Its file.
    pub path: PathBuf,
    /// The log position it reflects.
    pub position: u64,
    /// The chain hash at that position.
    pub chain_hash: Hash,
    /// Bytes of the file.
    pub len_bytes: u64,
}

/// A snapshot that could not be used, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedSnapshot {
    /// Its file.
    pub path: PathBuf,
    /// Why it was skipped.
    pub reason: String,
}

/// The result of loading: the newest usable snapshot (state and file), and the newer ones that
/// were skipped.
#[derive(Debug)]
pub struct Loaded<S> {
    /// The state and its file, if any snapshot was usable.
    pub snapshot: Option<(S, SnapshotInfo)>,
    /// Newer snapshots that could not be used, and why.
    pub skipped: Vec<SkippedSnapshot>,
}

/// What [`Snapshotter::recover`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Position of the snapshot used (0: none, replayed from the start).
    pub snapshot_position: u64,
    /// Events applied after it.
    pub events_replayed: u64,
    /// Position of the recovered state (the log head at recovery).
    pub position: u64,
    /// Time from the call to the recovered state.
    pub elapsed: Duration,
    /// Newer snapshots that were skipped.
    pub skipped: Vec<SkippedSnapshot>,
}

/// Writes, rotates and loads snapshots of one state type, and recovers it with the log.
#[derive(Debug)]
pub struct Snapshotter {
    vfs: Arc<dyn Vfs>,
    dir: PathBuf,
    options: SnapshotOptions,
    last_position: u64,
    last_at: Instant,
    last_log_bytes: u64,
}

impl Snapshotter {
    /// Opens (or creates) the snapshot directory on the real file system.
    pub fn open(dir: impl AsRef<Path>, options: SnapshotOptions) -> Result<Self> {
        Self::open_with_vfs(Arc::new(StdVfs), dir, options)
    }

    /// Opens (or creates) the snapshot directory on the given file system.
    pub fn open_with_vfs(
        vfs: Arc<dyn Vfs>,
        dir: impl AsRef<Path>,
        options: SnapshotOptions,
    ) -> Result<Self> {
        if options.copies == 0 {
            return Err(Error::InvalidOptions("copies must be at least 1".into()));
        }
        let dir = dir.as_ref().to_path_buf();
        vfs.create_dir_all(&dir).map_err(io("create snapshot directory"))?;
        let mut removed = false;
        for name in vfs.list(&dir).map_err(io("list snapshot directory"))? {
            if name.ends_with(TEMP_SUFFIX) {
                vfs.remove(&dir.join(&name)).map_err(io("remove temporary snapshot"))?;
                removed = true;
            }
        }
        if removed {
            vfs.sync_dir(&dir).map_err(io("sync snapshot directory"))?;
        }
        let mut snapshotter = Self {
            vfs,
            dir,
            options,
            last_position: 0,
            last_at: Instant::now(),
            last_log_bytes: 0,
        };
        snapshotter.last_position = snapshotter.list()?.first().map_or(0, |s| s.position);
        Ok(snapshotter)
    }

    /// The snapshot directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Snapshot files present, newest first (not checked).
    pub fn list(&self) -> Result<Vec<SnapshotInfo>> {
        let mut out = Vec::new();
        for name in self.vfs.list(&self.dir).map_err(io("list snapshot directory"))? {
            let Some(position) = parse_snapshot_name(&name) else { continue };
            let path = self.dir.join(&name);
            let len_bytes =
                self.vfs.open(&path, false).and_then(|f| f.len()).map_err(io("stat snapshot"))?;
            out.push(SnapshotInfo { path, position, chain_hash: GENESIS_HASH, len_bytes });
        }
        out.sort_by_key(|s| std::cmp::Reverse(s.position));
        Ok(out)
    }

    /// Writes a snapshot of `state` at `at` atomically and durably, then removes all but the
    /// newest `copies`.
    pub fn save<S: Serialize>(&mut self, state: &S, at: LogPoint) -> Result<SnapshotInfo> {
        let payload = self.options.codec.encode(state).map_err(Error::Encode)?;
        self.write(self.options.codec, &[&payload], at)
    }

    /// [`Snapshotter::save`] of a state that is one byte string (a struct of one `Vec<u8>`
    /// field, or a `Vec<u8>`), written from where it lies instead of encoded into a copy:
    /// in the postcard codec whatever [`SnapshotOptions::codec`] says (the header records
    /// it), where a byte string is its length as a LEB128 varint, then the bytes. Load it
    /// with [`Snapshotter::load`] as that type. For states of many megabytes, whose copy
    /// would double the memory they take while saved.
    pub fn save_bytes(&mut self, bytes: &[u8], at: LogPoint) -> Result<SnapshotInfo> {
        let mut len = [0u8; 10];
        let mut used = 0;
        let mut rest = bytes.len() as u64;
        while rest >= 0x80 {
            len[used] = (rest as u8) | 0x80;
            rest >>= 7;
            used += 1;
        }
        len[used] = rest as u8;
        self.write(Codec::Postcard, &[&len[..=used], bytes], at)
    }

    /// Writes `payload` (the concatenation of its pieces, encoded in `codec`) as the
    /// snapshot at `at`: a temporary file, fsync, rename, directory fsync, then old copies
    /// removed.
    fn write(&mut self, codec: Codec, payload: &[&[u8]], at: LogPoint) -> Result<SnapshotInfo> {
        let payload_len: usize = payload.iter().map(|piece| piece.len()).sum();
        if payload_len as u64 > self.options.max_snapshot_bytes {
            return Err(Error::TooLarge {
                len_bytes: payload_len as u64,
                max_bytes: self.options.max_snapshot_bytes,
            });
        }
        let mut crc = crc32fast::Hasher::new();
        for piece in payload {
            crc.update(piece);
        }
        let header = SnapshotHeader {
            codec,
            position: at.position,
            chain_hash: at.hash,
            payload_len: payload_len as u64,
            payload_crc: crc.finalize(),
        };
        let name = snapshot_name(at.position);
        let path = self.dir.join(&name);
        let tmp = self.dir.join(format!("{name}{TEMP_SUFFIX}"));
        let file = self.vfs.open(&tmp, true).map_err(io("create snapshot"))?;
        file.set_len(0).map_err(io("truncate snapshot"))?;
        // Header and payload pieces written apart: a copy of a large payload would double
        // its memory for the length of the save.
        file.write_all_at(&header.encode(), 0).map_err(io("write snapshot"))?;
        let mut offset = SNAPSHOT_HEADER_BYTES as u64;
        for piece in payload {
            file.write_all_at(piece, offset).map_err(io("write snapshot"))?;
            offset += piece.len() as u64;
        }
        let len_bytes = offset;
        file.sync_data().map_err(io("sync snapshot"))?;
        self.vfs.rename(&tmp, &path).map_err(io("rename snapshot"))?;
        self.vfs.sync_dir(&self.dir).map_err(io("sync snapshot directory"))?;
        let snapshots = self.list()?;
        let mut removed = false;
        for old in snapshots.iter().skip(self.options.copies) {
            self.vfs.remove(&old.path).map_err(io("remove old snapshot"))?;
            removed = true;
        }
        if removed {
            self.vfs.sync_dir(&self.dir).map_err(io("sync snapshot directory"))?;
        }
        self.last_position = at.position;
        self.last_at = Instant::now();
        info!(position = at.position, len_bytes, "snapshot saved");
        Ok(SnapshotInfo { path, position: at.position, chain_hash: at.hash, len_bytes })
    }

    /// Loads the newest snapshot that parses and decodes (not checked against a log); the
    /// skipped ones are reported.
    pub fn load<S: DeserializeOwned>(&self) -> Result<Loaded<S>> {
        self.load_checked(|_| Ok(()))
    }

    fn load_checked<S: DeserializeOwned>(
        &self,
        check: impl Fn(&SnapshotHeader) -> std::result::Result<(), String>,
    ) -> Result<Loaded<S>> {
        let mut skipped = Vec::new();
        for info in self.list()? {
            match self.read_one::<S>(&info.path).and_then(|(header, state)| {
                check(&header)?;
                Ok((header, state))
            }) {
                Ok((header, state)) => {
                    let info = SnapshotInfo { chain_hash: header.chain_hash, ..info };
                    return Ok(Loaded { snapshot: Some((state, info)), skipped });
                }
                Err(reason) => {
                    warn!(path = %info.path.display(), reason, "snapshot unusable; trying an older one");
                    metrics::counter!("keel_snapshot_load_failures_total").increment(1);
                    skipped.push(SkippedSnapshot { path: info.path, reason });
                }
            }
        }
        Ok(Loaded { snapshot: None, skipped })
    }

    fn read_one<S: DeserializeOwned>(
        &self,
        path: &Path,
    ) -> std::result::Result<(SnapshotHeader, S), String> {
        let file = self.vfs.open(path, false).map_err(|e| format!("open: {e}"))?;
        let len = file.len().map_err(|e| format!("stat: {e}"))?;
        if len > self.options.max_snapshot_bytes + SNAPSHOT_HEADER_BYTES as u64 {
            return Err(format!("{len} bytes, larger than allowed"));
        }
        let mut bytes = vec![0u8; len as usize];
        file.read_exact_at(&mut bytes, 0).map_err(|e| format!("read: {e}"))?;
        let (header, payload) = parse_file(&bytes).map_err(str::to_owned)?;
        if Some(header.position)
            != path.file_name().and_then(|n| n.to_str()).and_then(parse_snapshot_name)
        {
            return Err("position does not match the file name".into());
        }
        let state = header.codec.decode(payload).map_err(|e| format!("decode: {e}"))?;
        Ok((header, state))
    }

    /// Recovers a state: the newest snapshot that is valid and agrees with the log's chain
    /// (the event at its position has its hash), then every later event replayed through
    /// [`Recover::apply`]. Without a usable snapshot the whole log is replayed (an error if it
    /// was compacted).
    pub fn recover<S>(&mut self, log: &EventLog) -> Result<(S, RecoveryReport)>
    where
        S: Recover + DeserializeOwned + Default,
    {
        let started = Instant::now();
        let head = log.head();
        let check = |header: &SnapshotHeader| -> std::result::Result<(), String> {
            let p = header.position;
            if p > head.position {
                return Err(format!("position {p} is beyond the log head {}", head.position));
            }
            if p + 1 < head.first_position {
                return Err(format!(
                    "the log was compacted past it (starts at {})",
                    head.first_position
                ));
            }
            let expected = if p + 1 == head.first_position {
                head.anchor_hash
            } else {
                log.read(p)
                    .map_err(|e| format!("reading the log at {p}: {e}"))?
                    .ok_or_else(|| format!("event {p} missing"))?
                    .hash
            };
            if expected != header.chain_hash {
                return Err(format!("chain hash at {p} does not match the log"));
            }
            Ok(())
        };
        let Loaded { snapshot: loaded, skipped } = self.load_checked::<S>(check)?;
        let (mut state, snapshot_position) = match loaded {
            Some((state, info)) => (state, info.position),
            None if head.first_position > 1 => {
                return Err(Error::Unrecoverable { first_position: head.first_position });
            }
            None => (S::default(), 0),
        };
        let mut next = snapshot_position + 1;
        let mut events_replayed = 0u64;
        while next <= head.position {
            let events = log.read_range(next, REPLAY_CHUNK_EVENTS).map_err(log_error("read"))?;
            let Some(last) = events.last() else { break };
            next = last.position + 1;
            for event in &events {
                state.apply(event);
            }
            events_replayed += events.len() as u64;
        }
        self.last_position = self.last_position.max(snapshot_position);
        self.last_log_bytes = head.log_bytes;
        self.last_at = Instant::now();
        let report = RecoveryReport {
            snapshot_position,
            events_replayed,
            position: next - 1,
            elapsed: started.elapsed(),
            skipped,
        };
        info!(
            snapshot_position,
            events_replayed,
            elapsed_us = report.elapsed.as_micros() as u64,
            "state recovered"
        );
        Ok((state, report))
    }

    /// Takes a snapshot of `state` (which reflects the log up to `at`) if the policy says one
    /// is due; after it is durable, compacts the log below it, keeping
    /// [`SnapshotOptions::keep_tail_events`].
    pub fn maybe_snapshot<S: Serialize>(
        &mut self,
        log: &EventLog,
        state: &S,
        at: LogPoint,
    ) -> Result<Option<SnapshotInfo>> {
        let events = at.position.saturating_sub(self.last_position);
        let tail_bytes = log.head().log_bytes.saturating_sub(self.last_log_bytes);
        if !self.options.policy.is_due(events, self.last_at.elapsed(), tail_bytes) {
            return Ok(None);
        }
        self.snapshot_now(log, state, at).map(Some)
    }

    /// Takes a snapshot now and compacts the log below it (if enabled).
    pub fn snapshot_now<S: Serialize>(
        &mut self,
        log: &EventLog,
        state: &S,
        at: LogPoint,
    ) -> Result<SnapshotInfo> {
        let info = self.save(state, at)?;
        if self.options.compact {
            let below = (at.position + 1).saturating_sub(self.options.keep_tail_events);
            if below > 1 {
                log.compact(below).map_err(log_error("compact"))?;
            }
        }
        self.last_log_bytes = log.head().log_bytes;
        Ok(info)
    }

    /// The newest valid snapshot decoded as `S` and rendered as pretty JSON, for inspection.
    pub fn inspect_json<S: DeserializeOwned + Serialize>(&self) -> Result<Option<String>> {
        self.load::<S>()?
            .snapshot
            .map(|(state, _)| {
                serde_json::to_string_pretty(&state).map_err(|e| Error::Encode(e.to_string()))
            })
            .transpose()
    }
}
