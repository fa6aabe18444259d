//! The e-stop flag, replicated by Raft across the floor.
