//! Helpers shared by the integration tests: where the shared fixtures live, and comparisons.
#![allow(dead_code)]

use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;

/// `../shared` beside the checkout (override with DIFFERNET_SHARED).
pub fn shared() -> PathBuf {
    std::env::var_os("DIFFERNET_SHARED").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared"))
}

pub fn fixture(name: &str) -> HashMap<String, Tensor> {
    let p = shared().join("fixtures").join(name);
    candle_core::safetensors::load(&p, &Device::Cpu).unwrap_or_else(|e| panic!("cannot load fixture {}: {e}", p.display()))
}

pub fn vec_f32(t: &Tensor) -> Vec<f32> {
    t.to_dtype(candle_core::DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    let (a, b) = (vec_f32(a), vec_f32(b));
    assert_eq!(a.len(), b.len(), "sizes differ");
    a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

pub fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    let num: f64 = got.iter().zip(want).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
    let den: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
    (num / den).sqrt()
}

/// The fixtures' deterministic input x0[c,i,j] = f32(sin(0.05·i·(c+1))·cos(0.03·j) + 0.1·c).
pub fn formula_x0() -> Vec<f32> {
    let n = 448;
    let mut v = Vec::with_capacity(3 * n * n);
    for c in 0..3 {
        for i in 0..n {
            for j in 0..n {
                let a = (0.05 * i as f64) * (c as f64 + 1.0);
                v.push((a.sin() * (0.03 * j as f64).cos() + 0.1 * c as f64) as f32);
            }
        }
    }
    v
}

/// The batch [x0, x0 flipped horizontally] of shape [2, 3, 448, 448].
pub fn formula_batch() -> Tensor {
    let x0 = Tensor::from_vec(formula_x0(), (1, 3, 448, 448), &Device::Cpu).unwrap();
    let idx: Vec<u32> = (0..448u32).rev().collect();
    let flipped = x0.index_select(&Tensor::new(idx, &Device::Cpu).unwrap(), 3).unwrap();
    Tensor::cat(&[x0, flipped], 0).unwrap()
}

/// EfficientNet-Lite0 weights from the fixtures.
pub fn efficientnet_weights() -> PathBuf {
    shared().join("fixtures/efficientnet_lite0.safetensors")
}

/// A model over EfficientNet-Lite0 features (the fixture weights) whose flow was trained for one
/// epoch on random features: enough to exercise everything that loads, scores and saves models.
pub fn efficientnet_model(hidden: usize, threshold: Option<f64>, seed: u64) -> differnet::model::Model {
    use differnet::backbone::BackboneKind;
    use differnet::model::{Manifest, Model, Threshold, TrainingData, FORMAT, FORMAT_VERSION};
    let mut cfg = differnet::flow::train::TrainConfig::new(BackboneKind::EfficientnetLite0);
    cfg.flow.hidden = hidden;
    cfg.epochs = 1;
    cfg.cached_views = 4;
    cfg.seed = seed;
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(seed);
    let feats: Vec<Vec<f32>> =
        (0..8).map(|_| (0..4 * cfg.flow.dim).map(|_| rand::Rng::random_range(&mut rng, 0.0..1.0)).collect()).collect();
    let (flow, summary) = differnet::flow::train::train_flow(&feats, &cfg, &Device::Cpu, &differnet::progress::Silent).unwrap();
    let manifest = Manifest {
        format: FORMAT.into(),
        format_version: FORMAT_VERSION,
        library_version: "test".into(),
        backbone: BackboneKind::EfficientnetLite0,
        backbone_weights_sha256: differnet::backbone::weights::sha256_file(&efficientnet_weights()).unwrap(),
        flow: cfg.flow.clone(),
        permutations: vec![],
        score: differnet::score::ScoreKind::MeanZ2,
        test_views: 1,
        train: cfg,
        threshold: threshold.map(|value| Threshold { value, method: "user".into() }),
        image_score: Default::default(),
        score_range: None,
        local_density: None,
        localization: None,
        training_data: TrainingData { root: "random".into(), n_images: 8, images_sha256: "0".into() },
        training: summary,
        flow_storage: Default::default(),
        parameters_sha256: String::new(),
    };
    Model::new(manifest, flow).unwrap()
}

/// PNG bytes of a generated RGB image.
pub fn png_image(width: u32, height: u32, seed: u8) -> Vec<u8> {
    let img = image::RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([(x * 3) as u8 ^ seed, (y * 5) as u8, ((x + y) as u8).wrapping_mul(seed)])
    });
    differnet::views::png_bytes(&img)
}

/// Runs the `differnet` binary with `DIFFERNET_HOME=home`: (success, stdout, stderr).
pub fn differnet_cli(home: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let out =
        std::process::Command::new(env!("CARGO_BIN_EXE_differnet")).args(args).env("DIFFERNET_HOME", home).output().expect("run differnet");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// A fresh `DIFFERNET_HOME` holding the EfficientNet-Lite0 fixture weights as if fetched.
pub fn home_with_efficientnet() -> tempfile::TempDir {
    let home = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(home.path().join("weights")).unwrap();
    std::fs::copy(efficientnet_weights(), home.path().join("weights/efficientnet-lite0.safetensors")).unwrap();
    home
}
