//! Integration tests of the real `safety-quorum` binary, driven through testkit.

mod bad_input;
mod cluster;
mod failsafe;
mod lifecycle;
mod support;
