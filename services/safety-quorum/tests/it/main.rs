//! Integration tests of the real `safety-quorum` binary, driven through testkit.

mod lifecycle;
