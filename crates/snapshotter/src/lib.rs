//! Atomic, checksummed snapshot files and recovery (newest valid snapshot + log-tail replay).
//!
//! A [`Snapshotter`] writes a state type's snapshot atomically (temporary file, `fdatasync`,
//! rename, directory sync) with a header holding the log position it reflects and the chain
//! hash there, keeps K rotating copies, and recovers any [`Recover`] state as the newest valid
//! snapshot plus a replay of the log after it. A corrupt, truncated or mismatching snapshot is
//! reported and skipped for the previous one; never a wrong state.
//!
//! ```no_run
//! use event_log::{Event, EventLog, Options};
//! use snapshotter::{Recover, SnapshotOptions, Snapshotter};
//!
//! #[derive(Default, serde::Serialize, serde::Deserialize)]
//! struct Count(u64);
//! impl Recover for Count {
//!     fn apply(&mut self, _event: &Event) { self.0 += 1; }
//! }
//!
//! let log = EventLog::open("/data/log", Options::default())?;
//! let mut snapshots = Snapshotter::open("/data/snapshots", SnapshotOptions::default())?;
//! let (state, report) = snapshots.recover::<Count>(&log)?;
//! println!("recovered {} events ({} replayed) in {:?}", state.0, report.events_replayed, report.elapsed);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod error;
pub mod format;
mod policy;
mod snapshotter;

pub use error::{Error, Result};
pub use format::{Codec, SnapshotHeader};
pub use policy::SnapshotPolicy;
pub use snapshotter::{
    DEFAULT_COPIES, DEFAULT_KEEP_TAIL_EVENTS, DEFAULT_MAX_SNAPSHOT_BYTES, Loaded, LogPoint,
    Recover, RecoveryReport, SkippedSnapshot, SnapshotInfo, SnapshotOptions, Snapshotter,
};
