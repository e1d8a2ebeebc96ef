//! EfficientNet-Lite0 (lukemelas key layout) with batch norm folded into the convolutions,
//! TF-SAME padding computed from the actual input size; feature maps from any MBConv stage.

use super::layers::{Activation, ConvLayer, Layer};
use super::{get, Backbone, BackboneKind};
use crate::error::{Error, Result};
use crate::kernels::{dense_conv2d, depthwise_conv2d, mbconv_fused, pointwise_conv, MbConvWeights};
use candle_core::Tensor;
use std::collections::HashMap;
use std::path::Path;

/// Batch-norm epsilon of the TF-Lite models (not PyTorch's 1e-5).
pub const BN_EPS: f64 = 1e-3;

/// Stages: (kernel, first stride, expansion, in, out, repeats).
pub const STAGES: [(usize, usize, usize, usize, usize, usize); 7] = [
    (3, 1, 1, 32, 16, 1),
    (3, 2, 6, 16, 24, 2),
    (5, 2, 6, 24, 40, 2),
    (3, 2, 6, 40, 80, 3),
    (5, 1, 6, 80, 112, 3),
    (5, 2, 6, 112, 192, 4),
    (3, 1, 6, 192, 320, 1),
];

/// Output channels of each stage.
pub const STAGE_CHANNELS: [usize; 7] = [16, 24, 40, 80, 112, 192, 320];

/// A convolution with batch norm folded in: weight [O, I/groups, k, k] and bias [O]
/// (also kept as plain vectors for the fused kernels).
struct FoldedConv {
    name: String,
    weight: Tensor,
    weight_vec: std::sync::Arc<[f32]>,
    bias_vec: std::sync::Arc<[f32]>,
}

fn fold(tensors: &HashMap<String, Tensor>, conv: &str, bn: &str, path: &Path) -> Result<FoldedConv> {
    let w = get(tensors, &format!("{conv}.weight"), path)?;
    let dims = w.dims().to_vec();
    let vec1 = |n: &str| -> Result<Vec<f32>> {
        let t = get(tensors, &format!("{bn}.{n}"), path)?;
        if t.dims() != [dims[0]] {
            return Err(Error::format(path, format!("`{bn}.{n}` has shape {:?}, expected [{}]", t.dims(), dims[0])));
        }
        Ok(t.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?)
    };
    let (gamma, beta, mean, var) = (vec1("weight")?, vec1("bias")?, vec1("running_mean")?, vec1("running_var")?);
    let per_out: usize = dims[1..].iter().product();
    let wv = w.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let mut folded = vec![0f32; wv.len()];
    let mut bias = vec![0f32; dims[0]];
    for o in 0..dims[0] {
        let scale = gamma[o] as f64 / (var[o] as f64 + BN_EPS).sqrt();
        for j in 0..per_out {
            folded[o * per_out + j] = (wv[o * per_out + j] as f64 * scale) as f32;
        }
        bias[o] = (beta[o] as f64 - mean[o] as f64 * scale) as f32;
    }
    let dev = w.device();
    Ok(FoldedConv {
        name: conv.to_string(),
        weight: Tensor::from_vec(folded.clone(), dims.as_slice(), dev)?,
        weight_vec: folded.into(),
        bias_vec: bias.into(),
    })
}

impl FoldedConv {
    /// This convolution as a [`Layer`] on a square input of side `size` (TF-SAME padding for
    /// it); `depthwise`: one group per channel.
    fn layer(&self, size: usize, stride: usize, depthwise: bool, activation: Activation) -> Layer {
        let d = self.weight.dims();
        let (t, b) = same_padding(size, d[2], stride);
        let groups = if depthwise { d[0] } else { 1 };
        Layer::Conv(ConvLayer {
            name: self.name.clone(),
            weight: self.weight_vec.clone(),
            shape: [d[0], d[1], d[2], d[3]],
            bias: self.bias_vec.clone(),
            stride,
            padding: [t, t, b, b],
            groups,
            activation,
        })
    }
}

/// TF "SAME" padding for one axis: (before, after).
pub fn same_padding(size: usize, kernel: usize, stride: usize) -> (usize, usize) {
    let out = size.div_ceil(stride);
    let pad = ((out - 1) * stride + kernel).saturating_sub(size);
    (pad / 2, pad - pad / 2)
}

/// TF-SAME padding of an NCHW tensor as (top, bottom, left, right).
fn same_padding_2d(x: &Tensor, kernel: usize, stride: usize) -> Result<(usize, usize, usize, usize)> {
    let (_, _, h, w) = x.dims4()?;
    let (t, b) = same_padding(h, kernel, stride);
    let (l, r) = same_padding(w, kernel, stride);
    Ok((t, b, l, r))
}

fn pointwise(x: &Tensor, c: &FoldedConv, relu6: bool, residual: Option<&Tensor>) -> Result<Tensor> {
    Ok(pointwise_conv(x, &c.weight_vec, &c.bias_vec, relu6, residual)?)
}

struct MbConv {
    expand: Option<FoldedConv>,
    depthwise: FoldedConv,
    project: FoldedConv,
    kernel: usize,
    stride: usize,
    residual: bool,
    /// The same weights for the fused kernel.
    fused: MbConvWeights,
}

impl MbConv {
    fn new(expand: Option<FoldedConv>, depthwise: FoldedConv, project: FoldedConv, kernel: usize, stride: usize, residual: bool) -> Self {
        let pair = |c: &FoldedConv| (c.weight_vec.clone(), c.bias_vec.clone());
        let fused = MbConvWeights {
            expand: expand.as_ref().map(pair),
            depthwise: pair(&depthwise),
            project: pair(&project),
            kernel,
            stride,
            residual,
        };
        MbConv { expand, depthwise, project, kernel, stride, residual, fused }
    }

    /// When no gradient is needed (feature extraction) on the CPU, the fused band-by-band
    /// kernel; otherwise the three differentiable ops (input gradients for localization).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if !x.track_op() && x.device().is_cpu() {
            let (_, _, h, w) = x.dims4()?;
            let (t, b) = same_padding(h, self.kernel, self.stride);
            let (l, r) = same_padding(w, self.kernel, self.stride);
            return Ok(mbconv_fused(x, &self.fused, (t, b, l, r))?);
        }
        let h = match &self.expand {
            Some(e) => pointwise(x, e, true, None)?,
            None => x.clone(),
        };
        let pad = same_padding_2d(&h, self.kernel, self.stride)?;
        let h = depthwise_conv2d(&h, &self.depthwise.weight, &self.depthwise.bias_vec, self.stride, pad, true)?;
        pointwise(&h, &self.project, false, if self.residual { Some(x) } else { None })
    }
}

pub struct EfficientNetLite0 {
    stem: FoldedConv,
    blocks: Vec<MbConv>,
    head: Option<(FoldedConv, Tensor, Tensor)>,
}

impl EfficientNetLite0 {
    pub fn new(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<Self> {
        let stem = fold(tensors, "_conv_stem", "_bn0", path)?;
        if stem.weight.dims() != [32, 3, 3, 3] {
            return Err(Error::format(path, format!("`_conv_stem.weight` has shape {:?}, expected [32, 3, 3, 3]", stem.weight.dims())));
        }
        let mut blocks = vec![];
        for (k, s, e, cin, cout, reps) in STAGES {
            for r in 0..reps {
                let i = blocks.len();
                let (inp, stride) = if r == 0 { (cin, s) } else { (cout, 1) };
                let p = format!("_blocks.{i}");
                let expand = if e != 1 { Some(fold(tensors, &format!("{p}._expand_conv"), &format!("{p}._bn0"), path)?) } else { None };
                let depthwise = fold(tensors, &format!("{p}._depthwise_conv"), &format!("{p}._bn1"), path)?;
                let project = fold(tensors, &format!("{p}._project_conv"), &format!("{p}._bn2"), path)?;
                if depthwise.weight.dims() != [inp * e, 1, k, k] || project.weight.dims() != [cout, inp * e, 1, 1] {
                    return Err(Error::format(path, format!("block {i} has unexpected shapes (not EfficientNet-Lite0?)")));
                }
                blocks.push(MbConv::new(expand, depthwise, project, k, stride, stride == 1 && inp == cout));
            }
        }
        let head = match (tensors.get("_fc.weight"), tensors.get("_fc.bias")) {
            (Some(w), Some(b)) => Some((fold(tensors, "_conv_head", "_bn1", path)?, w.clone(), b.clone())),
            _ => None,
        };
        Ok(EfficientNetLite0 { stem, blocks, head })
    }

    /// ImageNet logits (head conv, ReLU6, mean, fc): used to check the weights are really ImageNet's.
    pub fn logits(&self, x: &Tensor) -> Result<Tensor> {
        let (conv, w, b) = self.head.as_ref().ok_or_else(|| Error::Weights("weights lack the classifier head".into()))?;
        let h = pointwise(&self.last_stage_map(x)?, conv, true, None)?.mean((2, 3))?;
        Ok(h.matmul(&w.t()?)?.broadcast_add(b)?)
    }

    /// The output of the last MBConv stage (320 channels, before the 1×1 head).
    pub fn last_stage_map(&self, x: &Tensor) -> Result<Tensor> {
        let mut maps = self.stage_maps(x, &[STAGES.len() - 1])?;
        Ok(maps.remove(0))
    }

    fn stem_forward(&self, x: &Tensor) -> Result<Tensor> {
        let pad = same_padding_2d(x, 3, 2)?;
        Ok(dense_conv2d(x, &self.stem.weight, &self.stem.bias_vec, 2, pad, true)?)
    }
}

impl Backbone for EfficientNetLite0 {
    fn kind(&self) -> BackboneKind {
        BackboneKind::EfficientnetLite0
    }
    fn stage_maps(&self, x: &Tensor, stages: &[usize]) -> Result<Vec<Tensor>> {
        let last = stages.iter().copied().max().ok_or_else(|| Error::Config("no feature stage requested".into()))?;
        if last >= STAGES.len() {
            return Err(Error::Config(format!("EfficientNet-Lite0 has stages 0..{}, not {last}", STAGES.len())));
        }
        let mut h = self.stem_forward(x)?;
        let mut found = vec![None; STAGES.len()];
        let mut first = 0;
        for (stage, (.., reps)) in STAGES.iter().enumerate().take(last + 1) {
            for b in &self.blocks[first..first + reps] {
                h = b.forward(&h)?;
            }
            first += reps;
            found[stage] = Some(h.clone());
        }
        Ok(stages.iter().map(|&s| found[s].clone().expect("stage computed")).collect())
    }

    fn layers(&self, input_size: usize, last_stage: usize) -> Result<Vec<Layer>> {
        if last_stage >= STAGES.len() {
            return Err(Error::Config(format!("EfficientNet-Lite0 has stages 0..{}, not {last_stage}", STAGES.len())));
        }
        let mut out = vec![self.stem.layer(input_size, 2, false, Activation::Relu6)];
        let mut side = input_size.div_ceil(2);
        let mut first = 0;
        for (stage, (.., reps)) in STAGES.iter().enumerate().take(last_stage + 1) {
            for b in &self.blocks[first..first + reps] {
                let mut block: Vec<Layer> = b.expand.iter().map(|e| e.layer(side, 1, false, Activation::Relu6)).collect();
                block.push(b.depthwise.layer(side, b.stride, true, Activation::Relu6));
                side = side.div_ceil(b.stride);
                block.push(b.project.layer(side, 1, false, Activation::None));
                if b.residual {
                    out.push(Layer::Residual(block));
                } else {
                    out.extend(block);
                }
            }
            first += reps;
            out.push(Layer::StageOutput(stage));
        }
        Ok(out)
    }
}

/// Multiply-adds ×2 of the stem and the blocks up to stage `last` for an input of side `size`.
pub fn flops(size: usize, last: usize) -> f64 {
    let mut side = size.div_ceil(2);
    let mut f = 2.0 * (32 * 3 * 9 * side * side) as f64;
    for (k, s, e, cin, cout, reps) in STAGES.into_iter().take(last + 1) {
        for r in 0..reps {
            let (inp, stride) = if r == 0 { (cin, s) } else { (cout, 1) };
            let exp = inp * e;
            if e != 1 {
                f += 2.0 * (inp * exp * side * side) as f64;
            }
            side = side.div_ceil(stride);
            f += 2.0 * (exp * k * k * side * side) as f64 + 2.0 * (exp * cout * side * side) as f64;
        }
    }
    f
}

#[cfg(test)]
mod tests {
    use super::same_padding;
    #[test]
    fn tf_same_padding_puts_the_extra_pixel_after() {
        assert_eq!(same_padding(7, 3, 2), (1, 1));
        assert_eq!(same_padding(8, 3, 2), (0, 1));
        assert_eq!(same_padding(7, 5, 2), (2, 2));
        assert_eq!(same_padding(14, 5, 1), (2, 2));
    }
}
