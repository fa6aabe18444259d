//! Integration tests of the snapshotter: one binary, one module per concern.

mod corruption;
mod power_loss;
mod recovery;
mod support;
