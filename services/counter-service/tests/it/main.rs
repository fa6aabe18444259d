//! Integration tests of the real `counter-service` binary, driven through testkit.

mod lifecycle;
