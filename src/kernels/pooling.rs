//! Overlapping max-pooling with its backward pass (AlexNet, VGG16) and subsampling by an integer
//! factor (the stage maps brought to one resolution).

use super::contiguous_f32;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Max-pool over NCHW with a square window, no padding, floor mode (torch's `MaxPool2d(k, s)`).
struct MaxPool {
    k: usize,
    s: usize,
}

fn pool_dims(l: &Layout, k: usize, s: usize) -> Result<(usize, usize, usize, usize, usize)> {
    let (n, c, h, w) = l.shape().dims4()?;
    if h < k || w < k {
        candle_core::bail!("max_pool: input {h}x{w} smaller than window {k}")
    }
    Ok((n * c, h, w, (h - k) / s + 1, (w - k) / s + 1))
}

/// Index (within the plane) of the first maximum of each window, as PyTorch picks it.
fn argmax_windows(x: &[f32], w: usize, oh: usize, ow: usize, k: usize, s: usize) -> Vec<usize> {
    let mut out = Vec::with_capacity(oh * ow);
    for oy in 0..oh {
        for ox in 0..ow {
            let mut best = f32::NEG_INFINITY;
            let mut at = (oy * s) * w + ox * s;
            for ky in 0..k {
                let row = (oy * s + ky) * w;
                for kx in 0..k {
                    let v = x[row + ox * s + kx];
                    if v > best || v.is_nan() {
                        best = v;
                        at = row + ox * s + kx;
                    }
                }
            }
            out.push(at);
        }
    }
    out
}

/// The maximum of each window (NaN when the window holds one, like `argmax_windows`): the
/// column maxima of the window's rows first (contiguous, vectorized), then across columns.
fn max_windows(x: &[f32], w: usize, ow: usize, k: usize, s: usize, out: &mut [f32]) {
    let nan_max = |a: f32, b: f32| if a.is_nan() || b.is_nan() { f32::NAN } else { a.max(b) };
    let mut rows = vec![0f32; w];
    for (oy, dst) in out.chunks_mut(ow).enumerate() {
        rows.copy_from_slice(&x[oy * s * w..(oy * s + 1) * w]);
        for ky in 1..k {
            let r = &x[(oy * s + ky) * w..(oy * s + ky + 1) * w];
            rows.iter_mut().zip(r).for_each(|(m, v)| *m = nan_max(*m, *v));
        }
        for (ox, d) in dst.iter_mut().enumerate() {
            *d = rows[ox * s..ox * s + k].iter().copied().fold(f32::NEG_INFINITY, nan_max);
        }
    }
}

impl CustomOp1 for MaxPool {
    fn name(&self) -> &'static str {
        "max_pool2d"
    }
    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(st, l, "max_pool2d")?;
        let (planes, h, w, oh, ow) = pool_dims(l, self.k, self.s)?;
        let mut out = vec![0f32; planes * oh * ow];
        out.par_chunks_mut(oh * ow).enumerate().for_each(|(p, o)| max_windows(&x[p * h * w..(p + 1) * h * w], w, ow, self.k, self.s, o));
        let (n, c, _, _) = l.shape().dims4()?;
        Ok((CpuStorage::F32(out), Shape::from((n, c, oh, ow))))
    }
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = arg.contiguous()?.apply_op2_no_bwd(&grad.contiguous()?, &MaxPoolBackward { k: self.k, s: self.s })?;
        Ok(Some(g))
    }
}

/// Scatters the output gradient of a max-pool to the argmax of each window.
struct MaxPoolBackward {
    k: usize,
    s: usize,
}

impl CustomOp2 for MaxPoolBackward {
    fn name(&self) -> &'static str {
        "max_pool2d_backward"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, "max_pool2d_backward")?;
        let g = contiguous_f32(s2, l2, "max_pool2d_backward")?;
        let (planes, h, w, oh, ow) = pool_dims(l1, self.k, self.s)?;
        let mut out = vec![0f32; planes * h * w];
        out.par_chunks_mut(h * w).enumerate().for_each(|(p, o)| {
            let plane = &x[p * h * w..(p + 1) * h * w];
            let gp = &g[p * oh * ow..(p + 1) * oh * ow];
            for (gi, i) in gp.iter().zip(argmax_windows(plane, w, oh, ow, self.k, self.s)) {
                o[i] += gi;
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// `MaxPool2d(kernel, stride)` (no padding, floor mode) with a backward pass.
pub fn max_pool2d(x: &Tensor, kernel: usize, stride: usize) -> Result<Tensor> {
    x.contiguous()?.apply_op1(MaxPool { k: kernel, s: stride })
}

/// Every `factor`-th row and column of each NCHW plane (nearest-neighbour downsampling by an
/// integer factor), planes in parallel. Forward only.
struct Subsample {
    factor: usize,
}

impl CustomOp1 for Subsample {
    fn name(&self) -> &'static str {
        "subsample"
    }
    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(st, l, "subsample")?;
        let (n, c, h, w) = l.shape().dims4()?;
        let f = self.factor.max(1);
        let (oh, ow) = (h / f, w / f);
        let mut out = vec![0f32; n * c * oh * ow];
        if oh * ow > 0 {
            out.par_chunks_mut(oh * ow).zip(x.par_chunks(h * w)).for_each(|(dst, plane)| {
                for (y, row) in dst.chunks_exact_mut(ow).enumerate() {
                    let src = &plane[y * f * w..];
                    row.iter_mut().enumerate().for_each(|(x, d)| *d = src[x * f]);
                }
            });
        }
        Ok((CpuStorage::F32(out), Shape::from((n, c, oh, ow))))
    }
}

/// `x[:, :, ::factor, ::factor]` cut to `size / factor` rows and columns, without gradient.
pub fn subsample(x: &Tensor, factor: usize) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&Subsample { factor })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn max_pool_forward_and_backward_route_to_first_max() -> Result<()> {
        // 1x1x3x5 input, window 3 stride 2 -> 1x2 output; windows overlap in column 2.
        let v = [1f32, 2., 9., 0., 1., 0., 0., 0., 0., 8., 3., 3., 0., 7., 0.];
        let x = Var::from_slice(&v, (1, 1, 3, 5), &Device::Cpu)?;
        let y = max_pool2d(x.as_tensor(), 3, 2)?;
        assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, vec![9., 9.]);
        let g = (y.flatten_all()? * Tensor::new(&[1f32, 10.], &Device::Cpu)?)?.sum_all()?.backward()?;
        let gx = g.get(&x).unwrap().flatten_all()?.to_vec1::<f32>()?;
        let mut want = vec![0f32; 15];
        want[2] = 11.0;
        assert_eq!(gx, want);
        Ok(())
    }

    #[test]
    fn subsample_takes_every_factor_th_row_and_column() -> Result<()> {
        let x = Tensor::randn(0f32, 1., (2, 3, 7, 9), &Device::Cpu)?;
        for f in [1, 2, 3] {
            let rows = Tensor::new((0..7 / f).map(|i| (i * f) as u32).collect::<Vec<_>>(), &Device::Cpu)?;
            let cols = Tensor::new((0..9 / f).map(|i| (i * f) as u32).collect::<Vec<_>>(), &Device::Cpu)?;
            let want = x.index_select(&rows, 2)?.index_select(&cols, 3)?;
            let got = subsample(&x, f)?;
            assert_eq!(got.dims(), want.dims());
            assert_eq!(got.flatten_all()?.to_vec1::<f32>()?, want.flatten_all()?.to_vec1::<f32>()?, "factor {f}");
        }
        Ok(())
    }
}
