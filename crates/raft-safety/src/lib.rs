//! A Raft group (TiKV raft-rs) for safety-critical state: redb storage, TCP transport, ReadIndex reads.
