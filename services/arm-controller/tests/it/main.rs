//! Integration tests of the real `arm-controller` binary, driven through testkit.

mod lifecycle;
