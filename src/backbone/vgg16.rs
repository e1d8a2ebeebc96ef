//! torchvision VGG16's convolutional part (`features`): 13 3×3 convolutions with ReLU in 5 blocks,
//! each block closed by a 2×2 max-pool; a stage is the pooled output of a block (stage 4 is `features`).

use super::layers::Layer;
use super::{expect_shape, get, Backbone, BackboneKind};
use crate::error::{Error, Result};
use crate::kernels::max_pool2d;
use crate::kernels::winograd::{conv_relu_each, WinogradConv};
use candle_core::Tensor;
use std::collections::HashMap;
use std::path::Path;

/// (torchvision index, out, in) of the 13 convolutions (all 3×3, stride 1, padding 1).
pub const LAYERS: [(usize, usize, usize); 13] = [
    (0, 64, 3),
    (2, 64, 64),
    (5, 128, 64),
    (7, 128, 128),
    (10, 256, 128),
    (12, 256, 256),
    (14, 256, 256),
    (17, 512, 256),
    (19, 512, 512),
    (21, 512, 512),
    (24, 512, 512),
    (26, 512, 512),
    (28, 512, 512),
];

/// Convolutions per block; each block ends with a 2×2, stride-2 max-pool.
pub const BLOCKS: [usize; 5] = [2, 2, 3, 3, 3];

/// Output channels of each stage (block).
pub const STAGE_CHANNELS: [usize; 5] = [64, 128, 256, 512, 512];

/// Multiply-adds ×2 of the convolutions up to the end of block `last_stage`, input side `size`.
pub fn flops(size: usize, last_stage: usize) -> f64 {
    let mut side = size;
    let mut layer = 0;
    let mut f = 0.0;
    for &n in &BLOCKS[..=last_stage.min(BLOCKS.len() - 1)] {
        for _ in 0..n {
            let (_, o, c) = LAYERS[layer];
            f += 2.0 * (o * c * 9 * side * side) as f64;
            layer += 1;
        }
        side /= 2;
    }
    f
}

struct Conv {
    name: String,
    weight: Tensor,
    bias: Tensor,
    fast: WinogradConv,
}

impl Conv {
    /// relu(conv(x) + b) of each input: Winograd F(4×4, 3×3) where no gradient is needed,
    /// candle's conv2d where one is (localization) or on CUDA.
    fn forward_each(&self, xs: &[Tensor]) -> Result<Vec<Tensor>> {
        if xs.iter().all(|x| x.device().is_cpu() && !x.track_op()) {
            return Ok(conv_relu_each(xs, &self.fast)?);
        }
        let bias = self.bias.reshape((1, (), 1, 1))?;
        xs.iter().map(|x| Ok(x.conv2d(&self.weight, 1, 1, 1, 1)?.broadcast_add(&bias)?.relu()?)).collect()
    }
}

pub struct Vgg16 {
    convs: Vec<Conv>,
}

impl Vgg16 {
    /// Random weights of the right shapes (for speed measurements).
    pub fn random(device: &candle_core::Device) -> Result<Self> {
        let mut t = HashMap::new();
        for (idx, o, i) in LAYERS {
            t.insert(format!("features.{idx}.weight"), Tensor::randn(0f32, 0.02, (o, i, 3, 3), device)?);
            t.insert(format!("features.{idx}.bias"), Tensor::zeros(o, candle_core::DType::F32, device)?);
        }
        Self::new(&t, Path::new("random"))
    }

    /// Builds from torchvision key names (`features.{0,2,5,...,28}.{weight,bias}`).
    pub fn new(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<Self> {
        let mut convs = vec![];
        for (idx, o, i) in LAYERS {
            let wn = format!("features.{idx}.weight");
            let bn = format!("features.{idx}.bias");
            let weight = get(tensors, &wn, path)?;
            let bias = get(tensors, &bn, path)?;
            expect_shape(&weight, &[o, i, 3, 3], &wn, path)?;
            expect_shape(&bias, &[o], &bn, path)?;
            let fast = WinogradConv::new(&weight.flatten_all()?.to_vec1::<f32>()?, &bias.to_vec1::<f32>()?, 3);
            convs.push(Conv { name: format!("features.{idx}"), weight, bias, fast });
        }
        Ok(Vgg16 { convs })
    }
}

impl Backbone for Vgg16 {
    fn kind(&self) -> BackboneKind {
        BackboneKind::Vgg16
    }
    fn stage_maps(&self, x: &Tensor, stages: &[usize]) -> Result<Vec<Tensor>> {
        Ok(self.stage_maps_of_each(std::slice::from_ref(x), stages)?.remove(0))
    }
    /// The scales run through each layer together (one set of Winograd products per layer).
    fn stage_maps_of_each(&self, xs: &[Tensor], stages: &[usize]) -> Result<Vec<Vec<Tensor>>> {
        BackboneKind::Vgg16.check_stages(stages)?;
        let last = *stages.last().ok_or_else(|| Error::Config("no VGG16 stage asked".into()))?;
        let mut out: Vec<Vec<Tensor>> = vec![Vec::with_capacity(stages.len()); xs.len()];
        let mut cur: Vec<Tensor> = xs.to_vec();
        let mut layer = 0;
        for (block, &n) in BLOCKS[..=last].iter().enumerate() {
            for conv in &self.convs[layer..layer + n] {
                cur = conv.forward_each(&cur)?;
            }
            layer += n;
            cur = cur.iter().map(|x| Ok(max_pool2d(x, 2, 2)?)).collect::<Result<_>>()?;
            if stages.contains(&block) {
                for (o, x) in out.iter_mut().zip(&cur) {
                    o.push(x.clone());
                }
            }
        }
        Ok(out)
    }

    fn layers(&self, _input_size: usize, last_stage: usize) -> Result<Vec<Layer>> {
        BackboneKind::Vgg16.check_stages(&[last_stage])?;
        let mut out = vec![];
        let mut layer = 0;
        for (block, &n) in BLOCKS[..=last_stage].iter().enumerate() {
            for c in &self.convs[layer..layer + n] {
                out.push(Layer::Conv(super::alexnet::conv_layer(&c.name, &c.weight, &c.bias, 1, 1)?));
            }
            layer += n;
            out.push(Layer::MaxPool { kernel: 2, stride: 2 });
            out.push(Layer::StageOutput(block));
        }
        Ok(out)
    }
}
