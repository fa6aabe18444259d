//! Edge-to-cloud store-and-forward over NATS JetStream with deterministic message ids.
