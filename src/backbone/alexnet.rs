//! torchvision AlexNet's convolutional part (`features`), the paper's feature extractor.
//! Max-pools use our differentiable op so input gradients reach the pixels (localization).

use super::layers::{Activation, ConvLayer, Layer};
use super::{expect_shape, get, Backbone, BackboneKind};
use crate::error::{Error, Result};
use crate::kernels::max_pool2d;
use crate::kernels::winograd::{conv_relu_each, PhaseSplitConv, WinogradConv};
use candle_core::Tensor;
use std::collections::HashMap;
use std::path::Path;

/// How a layer runs when no gradient is needed.
enum FastKernel {
    /// Winograd F(2×2, 5×5) and F(4×4, 3×3): the stride-1 layers, kernels transformed once.
    Winograd(WinogradConv),
    /// conv1 (11×11, stride 4): its 4×4 phase planes through a 3×3 F(4×4, 3×3).
    PhaseSplit(PhaseSplitConv),
}

struct Conv {
    name: String,
    weight: Tensor,
    bias: Tensor,
    fast: FastKernel,
    stride: usize,
    padding: usize,
}

impl Conv {
    /// relu(conv(x) + b) of each input: one Winograd call for all of them where no gradient is
    /// needed, candle's conv2d where one is (localization) or on CUDA.
    fn forward_each(&self, xs: &[Tensor]) -> Result<Vec<Tensor>> {
        if xs.iter().all(|x| x.device().is_cpu() && !x.track_op()) {
            return Ok(match &self.fast {
                FastKernel::Winograd(wg) => conv_relu_each(xs, wg)?,
                FastKernel::PhaseSplit(ps) => ps.conv_relu_each(xs)?,
            });
        }
        let bias = self.bias.reshape((1, (), 1, 1))?;
        xs.iter().map(|x| Ok(x.conv2d(&self.weight, self.padding, self.stride, 1, 1)?.broadcast_add(&bias)?.relu()?)).collect()
    }
}

pub struct AlexNet {
    convs: Vec<Conv>,
}

/// (torchvision index, out, in, kernel, stride, padding) of the five convolutions.
pub const LAYERS: [(usize, usize, usize, usize, usize, usize); 5] =
    [(0, 64, 3, 11, 4, 2), (3, 192, 64, 5, 1, 2), (6, 384, 192, 3, 1, 1), (8, 256, 384, 3, 1, 1), (10, 256, 256, 3, 1, 1)];

/// Multiply-adds ×2 of the five convolutions for an input of side `size`.
pub fn flops(size: usize) -> f64 {
    let conv = |s: usize, k: usize, st: usize, p: usize| (s + 2 * p - k) / st + 1;
    let pool = |s: usize| (s - 3) / 2 + 1;
    let mut side = size;
    let mut f = 0.0;
    for (i, (_, o, c, k, st, p)) in LAYERS.iter().enumerate() {
        side = conv(side, *k, *st, *p);
        f += 2.0 * (o * c * k * k * side * side) as f64;
        if i < 2 {
            side = pool(side);
        }
    }
    f
}

impl AlexNet {
    /// Random weights of the right shapes (for speed measurements; weights do not affect speed).
    pub fn random(device: &candle_core::Device) -> Result<Self> {
        let mut t = HashMap::new();
        for (idx, o, i, k, _, _) in LAYERS {
            t.insert(format!("features.{idx}.weight"), Tensor::randn(0f32, 0.02, (o, i, k, k), device)?);
            t.insert(format!("features.{idx}.bias"), Tensor::zeros(o, candle_core::DType::F32, device)?);
        }
        Self::new(&t, Path::new("random"))
    }

    /// Builds from torchvision key names (`features.{0,3,6,8,10}.{weight,bias}`).
    pub fn new(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<Self> {
        let mut convs = vec![];
        for (idx, o, i, k, stride, padding) in LAYERS {
            let wn = format!("features.{idx}.weight");
            let bn = format!("features.{idx}.bias");
            let weight = get(tensors, &wn, path)?;
            let bias = get(tensors, &bn, path)?;
            expect_shape(&weight, &[o, i, k, k], &wn, path)?;
            expect_shape(&bias, &[o], &bn, path)?;
            let (weight_rows, bias_values) = (weight.flatten_all()?.to_vec1::<f32>()?, bias.to_vec1::<f32>()?);
            let fast = if WinogradConv::supports(k, stride, padding) {
                FastKernel::Winograd(WinogradConv::new(&weight_rows, &bias_values, k))
            } else {
                FastKernel::PhaseSplit(PhaseSplitConv::new(&weight_rows, &bias_values, k, stride, padding))
            };
            convs.push(Conv { name: format!("features.{idx}"), weight, bias, fast, stride, padding });
        }
        Ok(AlexNet { convs })
    }
}

impl Backbone for AlexNet {
    fn kind(&self) -> BackboneKind {
        BackboneKind::Alexnet
    }
    /// AlexNet has one feature stage (0): the output of `features`.
    fn stage_maps(&self, x: &Tensor, stages: &[usize]) -> Result<Vec<Tensor>> {
        Ok(self.stage_maps_of_each(std::slice::from_ref(x), stages)?.remove(0))
    }
    /// The scales run through each layer together, so that the Winograd layers do one set of
    /// products for all of them.
    fn stage_maps_of_each(&self, xs: &[Tensor], stages: &[usize]) -> Result<Vec<Vec<Tensor>>> {
        if stages != [0] {
            return Err(Error::Config(format!("AlexNet has one feature stage (0), not {stages:?}")));
        }
        let c = &self.convs;
        let pool_each = |xs: Vec<Tensor>| -> Result<Vec<Tensor>> { xs.iter().map(|x| Ok(max_pool2d(x, 3, 2)?)).collect() };
        let xs = pool_each(c[0].forward_each(xs)?)?;
        let xs = pool_each(c[1].forward_each(&xs)?)?;
        let xs = c[4].forward_each(&c[3].forward_each(&c[2].forward_each(&xs)?)?)?;
        Ok(pool_each(xs)?.into_iter().map(|x| vec![x]).collect())
    }

    fn layers(&self, _input_size: usize, last_stage: usize) -> Result<Vec<Layer>> {
        if last_stage != 0 {
            return Err(Error::Config(format!("AlexNet has one feature stage (0), not {last_stage}")));
        }
        let mut out = vec![];
        for (i, c) in self.convs.iter().enumerate() {
            out.push(Layer::Conv(conv_layer(&c.name, &c.weight, &c.bias, c.stride, c.padding)?));
            if i < 2 || i == 4 {
                out.push(Layer::MaxPool { kernel: 3, stride: 2 });
            }
        }
        out.push(Layer::StageOutput(0));
        Ok(out)
    }
}

/// A torchvision convolution (symmetric padding, ReLU after) as a [`Layer`]'s data.
pub(crate) fn conv_layer(name: &str, weight: &Tensor, bias: &Tensor, stride: usize, padding: usize) -> Result<ConvLayer> {
    let d = weight.dims4()?;
    Ok(ConvLayer {
        name: name.to_string(),
        weight: weight.flatten_all()?.to_vec1::<f32>()?.into(),
        shape: [d.0, d.1, d.2, d.3],
        bias: bias.to_vec1::<f32>()?.into(),
        stride,
        padding: [padding; 4],
        groups: 1,
        activation: Activation::Relu,
    })
}
