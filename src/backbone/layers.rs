//! A backbone's layers as plain data (weights, strides, paddings, activations), in order, for
//! runtimes other than this crate's kernels: the ONNX export builds its graph from them.

use std::sync::Arc;

/// What follows a convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    None,
    Relu,
    /// min(max(x, 0), 6) (EfficientNet-Lite).
    Relu6,
}

/// A 2-D convolution with bias (batch norm already folded in), then its activation.
#[derive(Clone, Debug)]
pub struct ConvLayer {
    /// Stable name of the layer's weights (the same at every input size).
    pub name: String,
    /// [out, in / groups, k, k] row-major.
    pub weight: Arc<[f32]>,
    pub shape: [usize; 4],
    pub bias: Arc<[f32]>,
    pub stride: usize,
    /// Zero padding (top, left, bottom, right): TF-SAME padding is uneven and depends on the
    /// input size, so a network's layers are listed per input size.
    pub padding: [usize; 4],
    pub groups: usize,
    pub activation: Activation,
}

/// One step of a backbone's forward pass.
#[derive(Clone, Debug)]
pub enum Layer {
    Conv(ConvLayer),
    /// Max-pool without padding, floor mode (torchvision's `MaxPool2d(kernel, stride)`).
    MaxPool {
        kernel: usize,
        stride: usize,
    },
    /// x + layers(x) (an MBConv block with a skip connection).
    Residual(Vec<Layer>),
    /// The map at this point is stage `s`'s output.
    StageOutput(usize),
}
