//! Per-arm motion plans, sensor ingest and fail-safe stop, on the event log.
