//! The integration tests of raft-safety: one binary, one module per area.

mod sim;
mod storage;
