//! `torch.save` files from elsewhere (zip and legacy) are parsed, never executed: any bytes are read or refused
//! with an error, never a panic, an abort or an allocation the file merely claims.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    differnet::fuzzing::read_torch_file(data);
});
