//! Routes raft-rs's `slog` records into `tracing` (target `raft`), so its election and
//! replication logs show up with the rest of the service's logs.

/// An `slog` drain that re-emits each record as a `tracing` event tagged with the node id.
pub(crate) struct TracingDrain {
    pub(crate) node: u64,
}

impl slog::Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(
        &self,
        record: &slog::Record<'_>,
        _values: &slog::OwnedKVList,
    ) -> Result<Self::Ok, Self::Err> {
        let node = self.node;
        // raft-rs logs on hot paths: format only what a subscriber wants.
        match record.level() {
            slog::Level::Critical | slog::Level::Error => {
                tracing::error!(target: "raft", node, "{}", record.msg());
            }
            slog::Level::Warning => tracing::warn!(target: "raft", node, "{}", record.msg()),
            slog::Level::Info => tracing::info!(target: "raft", node, "{}", record.msg()),
            slog::Level::Debug => tracing::debug!(target: "raft", node, "{}", record.msg()),
            slog::Level::Trace => tracing::trace!(target: "raft", node, "{}", record.msg()),
        }
        Ok(())
    }
}

/// A raft-rs logger for member `node`.
pub(crate) fn raft_logger(node: u64) -> slog::Logger {
    slog::Logger::root(TracingDrain { node }, slog::o!())
}
