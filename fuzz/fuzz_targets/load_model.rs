//! Model files (safetensors header, manifest, parameters) must be refused cleanly, never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    differnet::fuzzing::load_model(data);
});
