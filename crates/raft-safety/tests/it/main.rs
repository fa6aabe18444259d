//! The integration tests of raft-safety: one binary, one module per area.

mod driver;
mod sim;
mod storage;
mod tcp;
