//! Hand-written forward and backward pass of the flow for fast CPU training: the computation of
//! `flow::NormalizingFlow::forward` and loss (eq. 4) on plain buffers, gradients written by gemm.

use crate::error::Result;
use crate::flow::adam::{adam_update, AdamConfig, AdamStep};
use crate::flow::{FlowConfig, NormalizingFlow};
use candle_core::Tensor;
use rayon::prelude::*;

use crate::kernels::sgemm::sgemm as gemm;

/// Parameters (or their gradients) in `NormalizingFlow::named_parameters` order.
pub struct FlowBuffers {
    pub tensors: Vec<Vec<f32>>,
}

impl FlowBuffers {
    /// Copies these parameters (in `named_parameters` order) into `flow`.
    pub fn write_to(&self, flow: &NormalizingFlow) -> Result<()> {
        for ((_, var), t) in flow.named_parameters().iter().zip(&self.tensors) {
            var.set(&Tensor::from_slice(t, var.dims(), var.device())?)?;
        }
        Ok(())
    }
}

/// Index of a parameter: block, subnet (0 = s1, 1 = s2), layer 0..4, bias?
fn idx(block: usize, subnet: usize, layer: usize, bias: bool) -> usize {
    ((block * 2 + subnet) * 4 + layer) * 2 + bias as usize
}

struct SubnetCache {
    input: Vec<f32>,
    /// Post-ReLU activations of the three hidden layers.
    hidden: [Vec<f32>; 3],
}

/// One affine half of a coupling block, y = e^{σ(s)} ⊙ x + t with (s, t) = r = subnet output.
struct AffineHalf {
    s_raw: Vec<f32>,
    e: Vec<f32>,
    y: Vec<f32>,
}

impl AffineHalf {
    /// `r` is [batch, 2n] (scales then shifts), `x` is [batch, n]; adds Σσ(s) to `logdet`.
    fn forward(r: &[f32], x: &[f32], n: usize, soft: &impl Fn(f32) -> f32, logdet: &mut [f64]) -> Self {
        let len = x.len();
        let (mut s_raw, mut e, mut y) = (vec![0f32; len], vec![0f32; len], vec![0f32; len]);
        for (b, ld_row) in logdet.iter_mut().enumerate() {
            let mut ld = 0f32;
            for i in 0..n {
                let (j, s) = (b * n + i, r[b * 2 * n + i]);
                let ls = soft(s);
                ld += ls;
                s_raw[j] = s;
                e[j] = ls.exp();
                y[j] = e[j] * x[j] + r[b * 2 * n + n + i];
            }
            *ld_row += ld as f64;
        }
        AffineHalf { s_raw, e, y }
    }

    /// From dL/dy (and dL/dlogdet per element, `g_ld`): (dL/dr, dL/dx through the product).
    fn backward(&self, gy: &[f32], x: &[f32], n: usize, dsoft: &impl Fn(f32) -> f32, g_ld: f32) -> (Vec<f32>, Vec<f32>) {
        let mut g_r = vec![0f32; 2 * gy.len()];
        let mut g_x = vec![0f32; gy.len()];
        for (j, &g) in gy.iter().enumerate() {
            let (b, i) = (j / n, j % n);
            g_x[j] = g * self.e[j];
            g_r[b * 2 * n + i] = (g * self.e[j] * x[j] + g_ld) * dsoft(self.s_raw[j]);
            g_r[b * 2 * n + n + i] = g;
        }
        (g_r, g_x)
    }
}

struct BlockCache {
    x1: Vec<f32>,
    x2: Vec<f32>,
    half1: AffineHalf,
    half2: AffineHalf,
    clamped: Vec<bool>,
    s1: SubnetCache,
    s2: SubnetCache,
}

/// Flow training state on plain buffers: parameters, gradients and Adam moments.
pub struct FlowTrainer {
    pub config: FlowConfig,
    perms: Vec<Vec<u32>>,
    shapes: Vec<(usize, usize)>,
    pub params: FlowBuffers,
    grads: FlowBuffers,
    m: FlowBuffers,
    v: FlowBuffers,
    step: u64,
}

impl FlowTrainer {
    /// A trainer starting from `NormalizingFlow::new(config, seed)` (same parameters), without
    /// keeping that flow in memory.
    pub fn new(config: FlowConfig, seed: u64) -> Result<Self> {
        let trainer = Self::from_flow(&NormalizingFlow::new(config, seed, &candle_core::Device::Cpu)?)?;
        crate::return_freed_memory();
        Ok(trainer)
    }

    /// Copies the parameters of `flow`.
    pub fn from_flow(flow: &NormalizingFlow) -> Result<Self> {
        let named = flow.named_parameters();
        let mut tensors = vec![];
        let mut shapes = vec![];
        for (_, v) in &named {
            tensors.push(v.as_tensor().flatten_all()?.to_vec1::<f32>()?);
            let d = v.dims();
            shapes.push(if d.len() == 2 { (d[0], d[1]) } else { (d[0], 1) });
        }
        let zeros = || FlowBuffers { tensors: tensors.iter().map(|t| vec![0f32; t.len()]).collect() };
        Ok(FlowTrainer {
            config: flow.config.clone(),
            perms: flow.blocks.iter().map(|b| b.perm.clone()).collect(),
            shapes,
            grads: zeros(),
            m: zeros(),
            v: zeros(),
            params: FlowBuffers { tensors },
            step: 0,
        })
    }

    /// Writes the trained parameters back into `flow`.
    pub fn write_to(&self, flow: &NormalizingFlow) -> Result<()> {
        self.params.write_to(flow)
    }

    /// The parameters alone, freeing gradients and Adam moments (training is over).
    pub fn into_parameters(self) -> FlowBuffers {
        self.params
    }

    #[allow(clippy::needless_range_loop)] // l indexes the layer's shapes, parameters and caches
    fn subnet_forward(&self, block: usize, subnet: usize, input: &[f32], batch: usize) -> (Vec<f32>, SubnetCache) {
        let mut h = input.to_vec();
        let mut hidden: [Vec<f32>; 3] = Default::default();
        for l in 0..4 {
            let (out, inp) = self.shapes[idx(block, subnet, l, false)];
            let w = &self.params.tensors[idx(block, subnet, l, false)];
            let b = &self.params.tensors[idx(block, subnet, l, true)];
            let mut a = vec![0f32; batch * out];
            a.par_chunks_mut(out).for_each(|row| row.copy_from_slice(b));
            gemm(batch, out, inp, &mut a, true, (&h, inp, 1), (w, 1, inp));
            if l < 3 {
                a.par_iter_mut().for_each(|v| *v = v.max(0.0));
                hidden[l] = a.clone();
            }
            h = a;
        }
        (h, SubnetCache { input: input.to_vec(), hidden })
    }

    /// Backpropagates `g` (gradient of the subnet output) and returns the input gradient. The
    /// parameter gradients are written to `grads`, or with `update` applied to the parameters at
    /// once, block by block while they are in cache (the gradients are then never stored).
    fn subnet_backward(
        &mut self,
        block: usize,
        subnet: usize,
        cache: &SubnetCache,
        mut g: Vec<f32>,
        batch: usize,
        update: Option<&AdamStep>,
    ) -> Vec<f32> {
        for l in (0..4).rev() {
            let (wi, bi) = (idx(block, subnet, l, false), idx(block, subnet, l, true));
            let (out, inp) = self.shapes[wi];
            let h_in: &[f32] = if l == 0 { &cache.input } else { &cache.hidden[l - 1] };
            // the input gradient first: it needs the weights before their update
            let mut gh = vec![0f32; batch * inp];
            gemm(batch, inp, out, &mut gh, false, (&g, out, 1), (&self.params.tensors[wi], inp, 1));
            if l > 0 {
                gh.par_iter_mut().zip(h_in.par_iter()).for_each(|(g, h)| {
                    if *h <= 0.0 {
                        *g = 0.0
                    }
                });
            }
            let mut gb = vec![0f32; out];
            for row in g.chunks(out) {
                gb.iter_mut().zip(row).for_each(|(a, b)| *a += b);
            }
            match update {
                None => {
                    gemm(out, inp, batch, &mut self.grads.tensors[wi], false, (&g, 1, out), (h_in, inp, 1));
                    self.grads.tensors[bi] = gb;
                }
                Some(step) => {
                    // weight gradient and Adam update for ROWS output rows at a time per job
                    const ROWS: usize = 32;
                    let (w, m, v) = (&mut self.params.tensors[wi], &mut self.m.tensors[wi], &mut self.v.tensors[wi]);
                    let g = &g;
                    w.par_chunks_mut(ROWS * inp)
                        .zip(m.par_chunks_mut(ROWS * inp))
                        .zip(v.par_chunks_mut(ROWS * inp))
                        .enumerate()
                        .for_each_init(Vec::new, |gw, (j, ((w, m), v))| {
                            let rows = w.len() / inp;
                            gw.resize(rows * inp, 0.0);
                            gemm(rows, inp, batch, gw, false, (&g[j * ROWS..], 1, out), (h_in, inp, 1));
                            step.apply(w, gw, m, v);
                        });
                    step.apply(&mut self.params.tensors[bi], &gb, &mut self.m.tensors[bi], &mut self.v.tensors[bi]);
                }
            }
            g = gh;
        }
        g
    }

    /// Loss L (eq. 4, batch mean / D) and gradients of all parameters for features y [batch, dim]
    /// (a non-finite loss is returned at once, the gradients left as they were).
    pub fn loss_and_gradients(&mut self, y: &[f32], batch: usize) -> f64 {
        self.forward_backward(y, batch, None)
    }

    /// One training step: the loss of `y` [batch, dim] (returned) and an Adam update, the same as
    /// `loss_and_gradients` then `adam_step` but faster (each gradient is applied while in cache;
    /// `gradients()` is not written). A non-finite loss is returned without any update.
    pub fn train_step(&mut self, y: &[f32], batch: usize, c: &AdamConfig) -> f64 {
        self.step += 1;
        let step = AdamStep::new(c, self.step);
        self.forward_backward(y, batch, Some(&step))
    }

    fn forward_backward(&mut self, y: &[f32], batch: usize, update: Option<&AdamStep>) -> f64 {
        let d = self.config.dim;
        let (n1, n2) = (d / 2, d - d / 2);
        let alpha = self.config.alpha;
        let inv_alpha = (1.0 / alpha) as f32;
        let c = (alpha * 0.636) as f32;
        let soft = |s: f32| (s * inv_alpha).atan() * c;
        let dsoft = |s: f32| {
            let u = s * inv_alpha;
            c * inv_alpha / (1.0 + u * u)
        };
        let mut x = y.to_vec();
        let mut logdet = vec![0f64; batch];
        let mut caches = vec![];
        for k in 0..self.config.blocks {
            let perm = &self.perms[k];
            let mut x1 = vec![0f32; batch * n1];
            let mut x2 = vec![0f32; batch * n2];
            for b in 0..batch {
                let row = &x[b * d..(b + 1) * d];
                for i in 0..n1 {
                    x1[b * n1 + i] = row[perm[i] as usize];
                }
                for i in 0..n2 {
                    x2[b * n2 + i] = row[perm[n1 + i] as usize];
                }
            }
            let (r2, c2) = self.subnet_forward(k, 1, &x2, batch);
            let half2 = AffineHalf::forward(&r2, &x1, n1, &soft, &mut logdet);
            let (r1, c1) = self.subnet_forward(k, 0, &half2.y, batch);
            let half1 = AffineHalf::forward(&r1, &x2, n2, &soft, &mut logdet);
            let mut out = vec![0f32; batch * d];
            let mut clamped = vec![false; batch * d];
            for b in 0..batch {
                out[b * d..b * d + n1].copy_from_slice(&half2.y[b * n1..(b + 1) * n1]);
                out[b * d + n1..(b + 1) * d].copy_from_slice(&half1.y[b * n2..(b + 1) * n2]);
            }
            for (v, cl) in out.iter_mut().zip(clamped.iter_mut()) {
                if v.abs() > 1e6 {
                    *v = v.clamp(-1e6, 1e6);
                    *cl = true;
                }
            }
            caches.push(BlockCache { x1, x2, half1, half2, clamped, s1: c1, s2: c2 });
            x = out;
        }
        // loss = mean_b(0.5·|z_b|² − logdet_b) / D
        let scale = 1.0 / (batch * d) as f64;
        let loss: f64 =
            (0..batch).map(|b| 0.5 * x[b * d..(b + 1) * d].iter().map(|v| (*v as f64).powi(2)).sum::<f64>() - logdet[b]).sum::<f64>()
                * scale;
        if !loss.is_finite() {
            return loss; // nothing to learn from; no update is applied
        }
        let g_ld = -scale as f32;
        let mut g: Vec<f32> = x.iter().map(|v| v * scale as f32).collect();
        for k in (0..self.config.blocks).rev() {
            let cache = caches.pop().unwrap();
            for (gv, cl) in g.iter_mut().zip(&cache.clamped) {
                if *cl {
                    *gv = 0.0;
                }
            }
            // y2 = e1 ⊙ x2 + t1(y1)
            let gy2: Vec<f32> = g.chunks(d).flat_map(|row| row[n1..].to_vec()).collect();
            let (g_r1, g_x2) = cache.half1.backward(&gy2, &cache.x2, n2, &dsoft, g_ld);
            let g_y1_from_s1 = self.subnet_backward(k, 0, &cache.s1, g_r1, batch, update);
            // y1 = e2 ⊙ x1 + t2(x2)
            let gy1: Vec<f32> = g.chunks(d).flat_map(|row| row[..n1].to_vec()).zip(&g_y1_from_s1).map(|(a, b)| a + b).collect();
            let (g_r2, g_x1) = cache.half2.backward(&gy1, &cache.x1, n1, &dsoft, g_ld);
            let g_x2_from_s2 = self.subnet_backward(k, 1, &cache.s2, g_r2, batch, update);
            let perm = &self.perms[k];
            let mut g_in = vec![0f32; batch * d];
            for b in 0..batch {
                for i in 0..n1 {
                    g_in[b * d + perm[i] as usize] = g_x1[b * n1 + i];
                }
                for i in 0..n2 {
                    g_in[b * d + perm[n1 + i] as usize] = g_x2[b * n2 + i] + g_x2_from_s2[b * n2 + i];
                }
            }
            g = g_in;
        }
        loss
    }

    /// Gradient buffers of the last `loss_and_gradients` call, in `named_parameters` order.
    pub fn gradients(&self) -> &[Vec<f32>] {
        &self.grads.tensors
    }

    /// One torch-style Adam step with the current gradients.
    pub fn adam_step(&mut self, c: &AdamConfig) {
        self.step += 1;
        for i in 0..self.params.tensors.len() {
            adam_update(&mut self.params.tensors[i], &self.grads.tensors[i], &mut self.m.tensors[i], &mut self.v.tensors[i], c, self.step);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fused_train_step_equals_gradients_then_adam() {
        // hidden 80: the fused update's 32-row blocks include a ragged one (32, 32, 16)
        let cfg = FlowConfig { dim: 12, blocks: 2, hidden: 80, alpha: 3.0 };
        let (mut a, mut b) = (FlowTrainer::new(cfg.clone(), 7).unwrap(), FlowTrainer::new(cfg, 7).unwrap());
        let adam = AdamConfig::default();
        let batch = 5;
        for step in 0..3 {
            let y: Vec<f32> = (0..batch * 12).map(|i| ((i * 31 + step * 17) % 23) as f32 / 7.0 - 1.5).collect();
            let la = a.loss_and_gradients(&y, batch);
            a.adam_step(&adam);
            let lb = b.train_step(&y, batch, &adam);
            assert!((la - lb).abs() < 1e-9, "step {step}: loss {la} vs {lb}");
        }
        for (pa, pb) in a.params.tensors.iter().zip(&b.params.tensors) {
            let err = pa.iter().zip(pb).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            assert!(err < 1e-6, "parameters differ by {err}");
        }
        assert!(
            a.params.tensors.iter().zip(&FlowTrainer::new(a.config.clone(), 7).unwrap().params.tensors).any(|(p, q)| p != q),
            "training changed nothing"
        );
    }
}
