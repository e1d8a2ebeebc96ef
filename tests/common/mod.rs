//! Helpers shared by the integration tests: where the shared fixtures live, and comparisons.
#![allow(dead_code)]

use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;

/// `../shared` beside the checkout (override with DIFFERNET_SHARED).
pub fn shared() -> PathBuf {
    std::env::var_os("DIFFERNET_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared"))
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
