#![no_main]
//! Coverage-guided fuzzing of the frame decoder on every stream kind.

use libfuzzer_sys::fuzz_target;
use postern_proto::{StreamKind, decode_frame, encode_frame};

fuzz_target!(|data: &[u8]| {
    for stream in [StreamKind::Enroll, StreamKind::Control, StreamKind::Session] {
        if let Ok(Some((msg, used))) = decode_frame(data, stream) {
            assert!(used <= data.len());
            // Whatever decodes must re-encode to the same bytes.
            let mut again = Vec::new();
            encode_frame(&msg, &mut again);
            assert_eq!(&again[..], &data[..used]);
        }
    }
});
