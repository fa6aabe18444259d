//! Integration tests of the real `arm-controller` binary, driven through testkit.

mod crash;
mod lifecycle;
mod outbox;
mod plans;
mod safety;
mod shutdown;
mod sim;
mod support;
