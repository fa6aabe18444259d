//! Atomic, checksummed snapshot files and recovery (newest valid snapshot + log-tail replay).
