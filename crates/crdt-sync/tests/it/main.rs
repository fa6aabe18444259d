//! Integration tests of crdt-sync: one binary, one module per concern.

mod convergence;
mod nats;
mod sim;
