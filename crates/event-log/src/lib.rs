//! Durable, group-committed, hash-chained multi-stream event log: segment files plus a redb index.
//!
//! The durable truth is an append-only, segmented, preallocated log of length-prefixed,
//! checksummed, hash-chained records (`docs/FORMATS.md` has the byte layout). One writer thread
//! drains every queued append into one write and one `fdatasync` (group commit) and only then
//! acknowledges them. A redb database beside the log holds the indexes (stream -> positions,
//! event id -> position for idempotency, outbox cursors) and a checkpoint of how much of the
//! log it covers; it is written with non-durable commits, made durable at checkpoints, and is
//! never on the acknowledgement path. On open, the checkpoint plus a replay of the log tail
//! rebuilds the rest, and a torn tail is cut.
//!
//! ```no_run
//! use event_log::{AppendRequest, EventLog, Options};
//! let log = EventLog::open("/var/lib/keel/log", Options::default())?;
//! let appended = log.append(AppendRequest::new("arm-7", [1; 16], "plan.updated", b"{}".to_vec()))?;
//! assert_eq!(log.read(appended.position)?.unwrap().stream, "arm-7");
//! # Ok::<(), event_log::Error>(())
//! ```

mod completion;
mod error;
mod index;
mod log;
mod options;
pub mod record;
mod segment;
pub mod sim;
pub mod vfs;
mod writer;

pub use completion::Pending;
pub use error::{Error, Result};
pub use log::{EventLog, INDEX_FILE_NAME, Stats, Subscription};
pub use options::*;
pub use record::{Event, GENESIS_HASH, Hash};
pub use segment::{PREALLOC_NAME, SEGMENT_SUFFIX, parse_segment_name, segment_name};
pub use vfs::{RedbBackend, StdVfs, Vfs, VfsFile};
