//! Image decoding and preprocessing must never panic or allocate without bound, whatever the bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    differnet::fuzzing::decode_and_preprocess(data);
});
