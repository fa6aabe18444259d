//! Integration tests of the event log: one binary, one module per concern.

mod bad_input;
mod basic;
mod corruption;
mod crash;
mod model;
mod power_loss;
mod support;
