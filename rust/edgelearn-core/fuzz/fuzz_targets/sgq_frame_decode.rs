//! Any bytes given to the SGQ frame decoder must give `Ok` or `Err`, never a panic; a decoded frame's
//! output holds exactly the elements its header names.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((header, values)) = edgelearn_core::sgq::decode(data) {
        assert_eq!(Some(values.len()), header.shape.elements("frame").ok());
    }
});
