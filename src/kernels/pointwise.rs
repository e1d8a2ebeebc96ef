//! 1×1 convolution as one matrix product per image, with bias, ReLU6 and the residual fused, and
//! its input gradient.

use super::contiguous_f32;
use super::direct_conv::relu6_grad;
use super::sgemm::{sgemm_with, Backend::Rust};
use super::SharedMut;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// 1×1 convolution as one matrix product per image (`gemm`), with bias, optional ReLU6 and
/// optional residual added in the same pass. Weight is [O, C] row-major.
#[derive(Clone)]
struct Pointwise {
    weight: std::sync::Arc<[f32]>,
    bias: std::sync::Arc<[f32]>,
    relu6: bool,
}

impl Pointwise {
    /// Gradient with respect to x of `relu6?(W·x + b)`, given the pre-residual output `pre`.
    fn input_grad(&self, x: &Tensor, pre: &Tensor, grad: &Tensor) -> Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        let o = self.bias.len();
        let g = if self.relu6 { relu6_grad(grad, pre)? } else { grad.clone() };
        let wt = Tensor::from_slice(&self.weight, (o, c), x.device())?.t()?.contiguous()?;
        wt.broadcast_matmul(&g.reshape((n, o, h * w))?)?.reshape((n, c, h, w))
    }

    fn run(&self, x: &[f32], shape: &Shape, residual: Option<&[f32]>) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = shape.dims4()?;
        let o = self.bias.len();
        if self.weight.len() != o * c {
            candle_core::bail!("pointwise_conv: weight has {} values, expected {o}x{c}", self.weight.len())
        }
        let hw = h * w;
        let mut out = vec![0f32; n * o * hw];
        // Column tiles small enough to stay in cache, so bias, ReLU6 and the residual are
        // applied right after the tile's product instead of in another pass over memory.
        const TILE: usize = 256;
        let tiles = hw.div_ceil(TILE);
        let dst = SharedMut(out.as_mut_ptr());
        (0..n * tiles).into_par_iter().for_each_init(Vec::new, |product, job| {
            let (b, t) = (job / tiles, job % tiles);
            let (c0, cols) = (t * TILE, TILE.min(hw - t * TILE));
            product.resize(o * cols, 0.0);
            // the gemm crate, not OpenBLAS, for these small, many products: as fast here
            // (measured), and EfficientNet features then do not depend on the system
            sgemm_with(Rust, o, cols, c, product, false, (&self.weight, c, 1), (&x[b * c * hw + c0..], hw, 1));
            // SAFETY: every job writes a disjoint column range [c0, c0+cols) of its image's rows.
            unsafe { store_rows(dst, b * o * hw + c0, hw, product, cols, &self.bias, self.relu6, residual) };
        });
        Ok((CpuStorage::F32(out), Shape::from((n, o, h, w))))
    }
}

impl CustomOp1 for Pointwise {
    fn name(&self) -> &'static str {
        "pointwise_conv"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.run(contiguous_f32(s, l, "pointwise_conv")?, l.shape(), None)
    }
    fn bwd(&self, x: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.input_grad(x, res, grad)?))
    }
}

impl CustomOp2 for Pointwise {
    fn name(&self) -> &'static str {
        "pointwise_conv_residual"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let r = contiguous_f32(s2, l2, "pointwise_conv_residual")?;
        self.run(contiguous_f32(s1, l1, "pointwise_conv_residual")?, l1.shape(), Some(r))
    }
    fn bwd(&self, x: &Tensor, residual: &Tensor, res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let pre = (res - residual)?;
        Ok((Some(self.input_grad(x, &pre, grad)?), Some(grad.clone())))
    }
}

/// Stores a product tile `product` [O, cols] into the output rows that start at `base` (row
/// stride `stride`) as `relu6?(p + bias)`, plus `residual` read at the same indices.
///
/// # Safety
/// `dst` must hold `base + (O-1)·stride + cols` values and no other thread may touch this range.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn store_rows(
    dst: SharedMut,
    base: usize,
    stride: usize,
    product: &[f32],
    cols: usize,
    bias: &[f32],
    relu6: bool,
    residual: Option<&[f32]>,
) {
    for (r, (p, &bv)) in product.chunks(cols).zip(bias).enumerate() {
        let start = base + r * stride;
        let row = std::slice::from_raw_parts_mut(dst.get().add(start), cols);
        row.iter_mut().zip(p).for_each(|(v, p)| *v = if relu6 { (p + bv).clamp(0.0, 6.0) } else { p + bv });
        if let Some(res) = residual {
            row.iter_mut().zip(&res[start..start + cols]).for_each(|(v, x)| *v += x);
        }
    }
}

/// Fused 1×1 convolution: `relu6?(W·x + b) (+ residual)`; `weight` is [O, C] row-major.
/// Differentiable with respect to x and the residual (weights are frozen).
pub fn pointwise_conv(
    x: &Tensor,
    weight: &std::sync::Arc<[f32]>,
    bias: &std::sync::Arc<[f32]>,
    relu6: bool,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let op = Pointwise { weight: weight.clone(), bias: bias.clone(), relu6 };
    let x = x.contiguous()?;
    match residual {
        Some(r) => x.apply_op2(&r.contiguous()?, op),
        None => x.apply_op1(op),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn pointwise_matches_matmul_with_bias_relu6_and_residual() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 3., (2, 5, 4, 3), &dev)?;
        let w = Tensor::randn(0f32, 1., (7, 5), &dev)?;
        let b = Tensor::randn(0f32, 1., 7, &dev)?;
        let r = Tensor::randn(0f32, 1., (2, 7, 4, 3), &dev)?;
        let want = w.broadcast_matmul(&x.reshape((2, 5, 12))?)?.broadcast_add(&b.reshape((1, 7, 1))?)?.reshape((2, 7, 4, 3))?;
        let want = (want.clamp(0f32, 6f32)? + &r)?;
        let (wv, bv): (std::sync::Arc<[f32]>, std::sync::Arc<[f32]>) =
            (w.flatten_all()?.to_vec1::<f32>()?.into(), b.to_vec1::<f32>()?.into());
        let got = pointwise_conv(&x, &wv, &bv, true, Some(&r))?;
        let diff = (want - got)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{diff}");
        Ok(())
    }
}
