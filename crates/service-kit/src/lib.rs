//! What every Keel service shares: flags, tracing, health and readiness, metrics, NATS, shutdown, errors.
