//! Integration tests of the real `edge-cloud-bridge` binary, driven through testkit.

mod lifecycle;
