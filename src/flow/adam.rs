//! `torch.optim.Adam` as DifferNet trains with it: L2 weight decay added to the gradient (not
//! decoupled like AdamW), bias-corrected moments, one fused in-place pass per parameter.

use crate::error::Result;
use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, InplaceOp2, Layout, Var};
use rayon::prelude::*;
use std::sync::Mutex;

/// Adam hyperparameters; defaults are DifferNet's (lr 2e-4, betas (0.8, 0.8), eps 1e-4, wd 1e-5).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamConfig {
    fn default() -> Self {
        AdamConfig { lr: 2e-4, beta1: 0.8, beta2: 0.8, eps: 1e-4, weight_decay: 1e-5 }
    }
}

pub struct Adam {
    pub config: AdamConfig,
    params: Vec<Var>,
    moments: Vec<Mutex<(Vec<f32>, Vec<f32>)>>,
    step: u64,
}

struct AdamKernel<'a> {
    moments: &'a Mutex<(Vec<f32>, Vec<f32>)>,
    c: &'a AdamConfig,
    step: u64,
}

impl InplaceOp2 for AdamKernel<'_> {
    fn name(&self) -> &'static str {
        "adam_step"
    }
    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<()> {
        let (CpuStorage::F32(p), CpuStorage::F32(g)) = (s1, s2) else { candle_core::bail!("adam: f32 parameters only") };
        let (Some((a1, b1)), Some((a2, b2))) = (l1.contiguous_offsets(), l2.contiguous_offsets()) else {
            candle_core::bail!("adam: parameters and gradients must be contiguous")
        };
        let (p, g) = (&mut p[a1..b1], &g[a2..b2]);
        let mut guard = self.moments.lock().unwrap();
        let (m, v) = &mut *guard;
        adam_update(p, g, m, v, self.c, self.step);
        Ok(())
    }
}

/// The constants of Adam step `step` (its bias corrections), applied to any slice of parameters.
#[derive(Clone, Copy, Debug)]
pub struct AdamStep {
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    step_size: f32,
    bc2_sqrt: f32,
}

impl AdamStep {
    /// Step numbers count from 1.
    pub fn new(c: &AdamConfig, step: u64) -> Self {
        let bc1 = 1.0 - c.beta1.powi(step as i32);
        let bc2 = 1.0 - c.beta2.powi(step as i32);
        AdamStep {
            beta1: c.beta1 as f32,
            beta2: c.beta2 as f32,
            eps: c.eps as f32,
            weight_decay: c.weight_decay as f32,
            step_size: (c.lr / bc1) as f32,
            bc2_sqrt: bc2.sqrt() as f32,
        }
    }

    /// Updates `p` (and its moments `m`, `v`) with gradient `g`, on this thread.
    pub fn apply(&self, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
        let (beta1, beta2) = (self.beta1, self.beta2);
        for i in 0..p.len() {
            let gi = g[i] + self.weight_decay * p[i];
            m[i] = beta1 * m[i] + (1.0 - beta1) * gi;
            v[i] = beta2 * v[i] + (1.0 - beta2) * gi * gi;
            let denom = v[i].sqrt() / self.bc2_sqrt + self.eps;
            p[i] -= self.step_size * m[i] / denom;
        }
    }
}

/// One Adam update of `p` with gradient `g` and moments `m`, `v` (step counts from 1), in parallel.
pub fn adam_update(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], c: &AdamConfig, step: u64) {
    let s = AdamStep::new(c, step);
    const CHUNK: usize = 1 << 14;
    p.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
        .for_each(|((p, g), (m, v))| s.apply(p, g, m, v));
}

impl Adam {
    pub fn new(params: Vec<Var>, config: AdamConfig) -> Self {
        let moments = params.iter().map(|p| Mutex::new((vec![0f32; p.elem_count()], vec![0f32; p.elem_count()]))).collect();
        Adam { config, params, moments, step: 0 }
    }

    /// One update of every parameter that has a gradient in `grads`.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step += 1;
        for (p, m) in self.params.iter().zip(&self.moments) {
            if let Some(g) = grads.get(p.as_tensor()) {
                let g = g.contiguous()?;
                p.as_tensor().inplace_op2(&g, &AdamKernel { moments: m, c: &self.config, step: self.step })?;
            }
        }
        Ok(())
    }
}
