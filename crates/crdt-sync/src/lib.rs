//! Typed CRDT replicas on automerge, made durable through event-log and synced over NATS JetStream.
