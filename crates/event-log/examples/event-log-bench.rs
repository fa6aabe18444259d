//! The event-log bench binary (floor F, single writer, 64 writers, recovery, NATS peer): being written.
fn main() {}
