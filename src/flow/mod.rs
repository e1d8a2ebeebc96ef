//! The normalizing flow f_NF (paper section 3.1): a chain of fixed permutations and GLOW-style
//! affine coupling blocks with soft-clamped scales (eq. 2), its log-determinant and exact inverse.

pub mod adam;
pub mod backward;
pub mod train;

use crate::error::{Error, Result};
use crate::kernels::atan;
use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use std::collections::HashMap;

/// Hyperparameters of the flow; defaults are the paper's (section 4.2).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FlowConfig {
    /// Length of the feature vector y.
    pub dim: usize,
    /// Number of coupling blocks (paper: 8; 12 for the multimodal experiment).
    pub blocks: usize,
    /// Width of the 3 hidden layers of each subnet (paper: 2048).
    pub hidden: usize,
    /// Soft-clamp bound α (paper: 3).
    pub alpha: f64,
}

impl FlowConfig {
    pub fn new(dim: usize) -> Self {
        FlowConfig { dim, blocks: 8, hidden: 2048, alpha: 3.0 }
    }
    pub fn validate(&self) -> Result<()> {
        if self.dim < 2 || self.blocks == 0 || self.hidden == 0 || self.alpha.is_nan() || self.alpha <= 0.0 {
            return Err(Error::Config(format!("flow needs dim >= 2, blocks >= 1, hidden >= 1, alpha > 0 (got {self:?})")));
        }
        Ok(())
    }

    /// Number of parameters of a flow with this configuration (saturating: a nonsense
    /// configuration gives a huge count rather than an overflow).
    pub fn parameter_count(&self) -> usize {
        let (n1, n2, h) = (self.dim / 2, self.dim - self.dim / 2, self.hidden);
        let subnet = |input: usize, output: usize| {
            let layer = |i: usize, o: usize| i.saturating_mul(o).saturating_add(o);
            layer(input, h).saturating_add(layer(h, h).saturating_mul(2)).saturating_add(layer(h, output))
        };
        subnet(n2, 2 * n1).saturating_add(subnet(n1, 2 * n2)).saturating_mul(self.blocks)
    }
}

/// The official permutations: numpy `np.random.seed(k); np.random.permutation(768)` for k = 0..7.
const OFFICIAL_PERMS_768: &str = include_str!("../../data/differnet_perms_seed0-7_n768.json");

/// Permutation of block `k`: the official ones for 768 dims and k < 8, else a seeded shuffle.
pub fn block_permutation(dim: usize, k: usize) -> Vec<u32> {
    if dim == 768 && k < 8 {
        let table: HashMap<String, Vec<u32>> = serde_json::from_str(OFFICIAL_PERMS_768).expect("embedded permutations are valid JSON");
        return table[&k.to_string()].clone();
    }
    use rand::seq::SliceRandom;
    let mut p: Vec<u32> = (0..dim as u32).collect();
    p.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(k as u64));
    p
}

fn inverse_permutation(p: &[u32]) -> Vec<u32> {
    let mut inv = vec![0u32; p.len()];
    for (i, &v) in p.iter().enumerate() {
        inv[v as usize] = i as u32;
    }
    inv
}

/// A fully connected layer y = x·Wᵀ + b with trainable parameters.
pub struct Linear {
    pub weight: Var,
    pub bias: Var,
}

impl Linear {
    fn init(input: usize, output: usize, rng: &mut impl Rng, dev: &Device) -> Result<Self> {
        // PyTorch's default: weight and bias uniform in ±1/sqrt(fan_in).
        let bound = 1.0 / (input as f32).sqrt();
        let w: Vec<f32> = (0..input * output).map(|_| rng.random_range(-bound..bound)).collect();
        let b: Vec<f32> = (0..output).map(|_| rng.random_range(-bound..bound)).collect();
        Ok(Linear { weight: Var::from_vec(w, (output, input), dev)?, bias: Var::from_vec(b, output, dev)? })
    }
    /// `frozen`: no gradient for the parameters is wanted (scoring, gradient maps); on the CPU
    /// the product then runs on `sgemm`, outside candle's graph when the input needs no gradient
    /// either, else as one op whose backward gives the input's gradient alone.
    fn forward(&self, x: &Tensor, frozen: bool) -> Result<Tensor> {
        if frozen && x.device().is_cpu() {
            let (w, b) = (self.weight.as_tensor(), self.bias.as_tensor());
            return Ok(if x.track_op() {
                crate::kernels::frozen_linear_tracked(x, w, b)?
            } else {
                crate::kernels::frozen_linear(x, w, b)?
            });
        }
        Ok(x.matmul(&self.weight.as_tensor().t()?)?.broadcast_add(self.bias.as_tensor())?)
    }
}

/// Subnet s (or t) of a coupling block: Linear-ReLU ×3, then Linear to 2× the other half.
pub struct Subnet {
    pub layers: [Linear; 4],
}

impl Subnet {
    fn init(input: usize, hidden: usize, output: usize, rng: &mut impl Rng, dev: &Device) -> Result<Self> {
        Ok(Subnet {
            layers: [
                Linear::init(input, hidden, rng, dev)?,
                Linear::init(hidden, hidden, rng, dev)?,
                Linear::init(hidden, hidden, rng, dev)?,
                Linear::init(hidden, output, rng, dev)?,
            ],
        })
    }
    pub fn forward(&self, x: &Tensor, frozen: bool) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, l) in self.layers.iter().enumerate() {
            h = l.forward(&h, frozen)?;
            if i < 3 {
                h = h.relu()?;
            }
        }
        Ok(h)
    }
}

/// One block of fig. 3: permutation, then y1 = e^{s2(x2)}⊙x1 + t2(x2), y2 = e^{s1(y1)}⊙x2 + t1(y1).
pub struct CouplingBlock {
    pub perm: Vec<u32>,
    perm_t: Tensor,
    inv_perm_t: Tensor,
    pub s1: Subnet,
    pub s2: Subnet,
}

pub struct NormalizingFlow {
    pub config: FlowConfig,
    pub blocks: Vec<CouplingBlock>,
}

/// Soft clamp of eq. 2 as the official code writes it: log e(s) = α·0.636·atan(s/α).
pub fn soft_clamp(s: &Tensor, alpha: f64) -> Result<Tensor> {
    Ok((atan(&(s / alpha)?)? * soft_clamp_factor(alpha))?)
}

/// The factor α·0.636 of [`soft_clamp`] (the official code's 2/π, rounded).
pub fn soft_clamp_factor(alpha: f64) -> f64 {
    alpha * 0.636
}

impl NormalizingFlow {
    /// A freshly initialised flow; the same seed gives the same parameters.
    pub fn new(config: FlowConfig, seed: u64, dev: &Device) -> Result<Self> {
        config.validate()?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let (l1, l2) = (config.dim / 2, config.dim - config.dim / 2);
        let mut blocks = vec![];
        for k in 0..config.blocks {
            let perm = block_permutation(config.dim, k);
            let s1 = Subnet::init(l1, config.hidden, 2 * l2, &mut rng, dev)?;
            let s2 = Subnet::init(l2, config.hidden, 2 * l1, &mut rng, dev)?;
            blocks.push(CouplingBlock::new(perm, s1, s2, dev)?);
        }
        Ok(NormalizingFlow { config, blocks })
    }

    /// Parameters by name, `blocks.{k}.{s1|s2}.{0|2|4|6}.{weight|bias}` (official order).
    pub fn named_parameters(&self) -> Vec<(String, &Var)> {
        let mut out = vec![];
        for (k, b) in self.blocks.iter().enumerate() {
            for (sn, s) in [("s1", &b.s1), ("s2", &b.s2)] {
                for (i, l) in s.layers.iter().enumerate() {
                    out.push((format!("blocks.{k}.{sn}.{}.weight", 2 * i), &l.weight));
                    out.push((format!("blocks.{k}.{sn}.{}.bias", 2 * i), &l.bias));
                }
            }
        }
        out
    }

    /// A flow of `config` whose parameters are the tensors of the same names (a model file's),
    /// without drawing a random initialization first; shapes must match `config`'s.
    pub fn from_parameters(config: FlowConfig, tensors: &HashMap<String, Tensor>, source: &std::path::Path, dev: &Device) -> Result<Self> {
        config.validate()?;
        let param = |name: String, dims: &[usize]| -> Result<Var> {
            let t = tensors.get(&name).ok_or_else(|| Error::format(source, format!("missing flow parameter `{name}`")))?;
            if t.dims() != dims {
                return Err(Error::format(source, format!("`{name}` has shape {:?}, expected {dims:?}", t.dims())));
            }
            Ok(Var::from_tensor(&t.to_dtype(DType::F32)?.to_device(dev)?)?)
        };
        let (l1, l2, h) = (config.dim / 2, config.dim - config.dim / 2, config.hidden);
        let subnet = |k: usize, name: &str, input: usize, output: usize| -> Result<Subnet> {
            let sizes = [(input, h), (h, h), (h, h), (h, output)];
            let layer = |i: usize| -> Result<Linear> {
                let (inp, out) = sizes[i];
                Ok(Linear {
                    weight: param(format!("blocks.{k}.{name}.{}.weight", 2 * i), &[out, inp])?,
                    bias: param(format!("blocks.{k}.{name}.{}.bias", 2 * i), &[out])?,
                })
            };
            Ok(Subnet { layers: [layer(0)?, layer(1)?, layer(2)?, layer(3)?] })
        };
        let mut blocks = vec![];
        for k in 0..config.blocks {
            let (s1, s2) = (subnet(k, "s1", l1, 2 * l2)?, subnet(k, "s2", l2, 2 * l1)?);
            blocks.push(CouplingBlock::new(block_permutation(config.dim, k), s1, s2, dev)?);
        }
        Ok(NormalizingFlow { config, blocks })
    }

    pub fn parameter_count(&self) -> usize {
        self.named_parameters().iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// z = f_NF(y) and log|det ∂z/∂y| per sample: [B, D] -> ([B, D], [B]).
    pub fn forward(&self, y: &Tensor) -> Result<(Tensor, Tensor)> {
        self.forward_with(y, false)
    }

    /// `forward` with the parameters frozen (scoring, gradient maps): faster on the CPU, and
    /// gradients reach only the input.
    pub fn forward_frozen(&self, y: &Tensor) -> Result<(Tensor, Tensor)> {
        self.forward_with(y, true)
    }

    fn forward_with(&self, y: &Tensor, frozen: bool) -> Result<(Tensor, Tensor)> {
        let mut x = y.clone();
        let mut logdet: Option<Tensor> = None;
        for b in &self.blocks {
            let (out, ld) = b.forward(&x, self.config.alpha, frozen)?;
            x = out;
            logdet = Some(match logdet {
                None => ld,
                Some(acc) => (acc + ld)?,
            });
        }
        Ok((x, logdet.expect("at least one block")))
    }

    /// y = f_NF⁻¹(z), exact up to rounding.
    pub fn inverse(&self, z: &Tensor) -> Result<Tensor> {
        let mut x = z.clone();
        for b in self.blocks.iter().rev() {
            x = b.inverse(&x, self.config.alpha)?;
        }
        Ok(x)
    }
}

impl CouplingBlock {
    fn new(perm: Vec<u32>, s1: Subnet, s2: Subnet, dev: &Device) -> Result<Self> {
        let inv = inverse_permutation(&perm);
        Ok(CouplingBlock { perm_t: Tensor::new(perm.as_slice(), dev)?, inv_perm_t: Tensor::new(inv.as_slice(), dev)?, perm, s1, s2 })
    }

    fn halves(x: &Tensor) -> Result<(Tensor, Tensor)> {
        let d = x.dim(1)?;
        Ok((x.narrow(1, 0, d / 2)?, x.narrow(1, d / 2, d - d / 2)?))
    }

    /// Splits a subnet output into (log-scale after soft clamp, shift) for a half of length n.
    fn scale_shift(r: &Tensor, n: usize, alpha: f64) -> Result<(Tensor, Tensor)> {
        Ok((soft_clamp(&r.narrow(1, 0, n)?, alpha)?, r.narrow(1, n, n)?))
    }

    pub fn forward(&self, x: &Tensor, alpha: f64, frozen: bool) -> Result<(Tensor, Tensor)> {
        let x = x.index_select(&self.perm_t, 1)?;
        let (x1, x2) = Self::halves(&x)?;
        let (n1, n2) = (x1.dim(1)?, x2.dim(1)?);
        let (ls2, t2) = Self::scale_shift(&self.s2.forward(&x2, frozen)?, n1, alpha)?;
        let y1 = ((ls2.exp()? * &x1)? + t2)?;
        let (ls1, t1) = Self::scale_shift(&self.s1.forward(&y1, frozen)?, n2, alpha)?;
        let y2 = ((ls1.exp()? * &x2)? + t1)?;
        let out = Tensor::cat(&[y1, y2], 1)?.clamp(-1e6f32, 1e6f32)?;
        let logdet = (ls1.sum(1)? + ls2.sum(1)?)?;
        Ok((out, logdet))
    }

    pub fn inverse(&self, y: &Tensor, alpha: f64) -> Result<Tensor> {
        let (y1, y2) = Self::halves(y)?;
        let (n1, n2) = (y1.dim(1)?, y2.dim(1)?);
        let (ls1, t1) = Self::scale_shift(&self.s1.forward(&y1, false)?, n2, alpha)?;
        let x2 = ((y2 - t1)? / ls1.exp()?)?;
        let (ls2, t2) = Self::scale_shift(&self.s2.forward(&x2, false)?, n1, alpha)?;
        let x1 = ((y1 - t2)? / ls2.exp()?)?;
        let x = Tensor::cat(&[x1, x2], 1)?.clamp(-1e6f32, 1e6f32)?;
        Ok(x.index_select(&self.inv_perm_t, 1)?)
    }
}

/// Training loss L(y) of eq. 4 averaged over the batch and divided by the dimension:
/// mean_b(0.5·‖z_b‖² − log det_b) / D (official code).
pub fn nll_loss(z: &Tensor, logdet: &Tensor) -> Result<Tensor> {
    let d = z.dim(1)? as f64;
    Ok(((z.sqr()?.sum(1)? * 0.5)? - logdet)?.mean_all()?.affine(1.0 / d, 0.0)?)
}
