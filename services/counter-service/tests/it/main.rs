//! Integration tests of the real `counter-service` binary, driven through testkit.

mod arm;
mod bad_input;
mod crash;
mod lifecycle;
mod partition;
mod restore;
mod support;
