//! Any bytes given to the SGQ frame decoder must give `Ok` or `Err`, never a panic; a decoded frame's
//! output holds exactly the elements its header names. Frames that use their stream's channel order are
//! decoded without one (refused) and with the reversed order of the header's channel count.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((header, values)) = edgelearn_core::sgq::decode(data) {
        assert!(!header.stream_order);
        assert_eq!(Some(values.len()), header.shape.elements("frame").ok());
    }
    let c = data
        .get(16..20)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]).min(1 << 16))
        .unwrap_or(0);
    let stream: Vec<u32> = (0..c).rev().collect();
    if let Ok((header, values)) = edgelearn_core::sgq::decode_with_order(data, Some(&stream)) {
        assert_eq!(Some(values.len()), header.shape.elements("frame").ok());
    }
});
