//! Types of every message that crosses a process boundary: JSON control messages and protobuf frames.
