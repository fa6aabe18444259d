//! Durable, group-committed, hash-chained multi-stream event log: segment files plus a redb index.
