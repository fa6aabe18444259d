//! Types of every message that crosses a process boundary, in one place.
//!
//! Control and low-rate messages are JSON ([`json`]), readable with any NATS client;
//! high-rate and binary ones are protobuf from `proto/keel.proto` ([`pb`]). Subject names
//! are built by [`subjects`] so no service spells one by hand.

pub mod json;
pub mod subjects;

/// Protobuf messages generated from `proto/keel.proto`.
#[allow(clippy::all, missing_docs, rust_2018_idioms)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/keel.v1.rs"));
}

pub use pb::{CloudSnapshotEnvelope, CrdtChangeEnvelope, CrdtSyncEnvelope, Sample, SensorFrame};

/// Decoding a wire message failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Not valid protobuf for the expected message.
    #[error("invalid protobuf: {0}")]
    Protobuf(#[from] prost::DecodeError),
    /// Not valid JSON for the expected message.
    #[error("invalid json: {0}")]
    Json(#[from] serde_json::Error),
    /// Larger than the limit for this message.
    #[error("message of {len_bytes} bytes exceeds the {max_bytes}-byte limit")]
    TooLarge {
        /// Size of the message.
        len_bytes: usize,
        /// The limit.
        max_bytes: usize,
    },
}

/// Largest sensor frame accepted (bytes): 64 samples of 16 joints with headroom.
pub const SENSOR_FRAME_BYTES_MAX: usize = 64 * 1024;

/// Decodes a sensor frame, refusing oversized input before parsing it.
pub fn decode_sensor_frame(bytes: &[u8]) -> Result<SensorFrame, DecodeError> {
    if bytes.len() > SENSOR_FRAME_BYTES_MAX {
        return Err(DecodeError::TooLarge {
            len_bytes: bytes.len(),
            max_bytes: SENSOR_FRAME_BYTES_MAX,
        });
    }
    Ok(prost::Message::decode(bytes)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn sensor_frames_round_trip() {
        let frame = SensorFrame {
            arm: "arm-001".into(),
            seq: 7,
            samples: vec![Sample { ts_us: 1, joints: vec![0.1, -0.2, 0.3, 0.0, 1.5, -1.5] }],
        };
        let bytes = frame.encode_to_vec();
        assert_eq!(decode_sensor_frame(&bytes).unwrap(), frame);
    }

    #[test]
    fn garbage_and_oversized_frames_are_refused() {
        assert!(matches!(decode_sensor_frame(&[0xff, 0xff, 0xff]), Err(DecodeError::Protobuf(_))));
        let big = vec![0u8; SENSOR_FRAME_BYTES_MAX + 1];
        assert!(matches!(decode_sensor_frame(&big), Err(DecodeError::TooLarge { .. })));
    }
}
