//! A fully connected layer with frozen parameters (`x·Wᵀ + b`): the scoring flow's subnets, and
//! its input-only gradient for the gradient maps; few-row products streamed, many by sgemm.

use super::contiguous_f32;
#[cfg(target_arch = "x86_64")]
use super::has_avx2_fma;
use super::sgemm::sgemm;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// A fully connected layer with frozen parameters, `x·Wᵀ + b` by `sgemm` (OpenBLAS when present):
/// scoring runs the flow's subnets with it. Its backward gives the input's gradient only (the
/// gradient maps' pass to the pixels); the parameters get none.
struct FrozenLinear;

impl CustomOp3 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen_linear"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, b) =
            (contiguous_f32(s1, l1, "frozen_linear")?, contiguous_f32(s2, l2, "frozen_linear")?, contiguous_f32(s3, l3, "frozen_linear")?);
        let (rows, input) = l1.shape().dims2()?;
        let (output, w_input) = l2.shape().dims2()?;
        if w_input != input || b.len() != output {
            candle_core::bail!("frozen_linear: x {:?}, weight {:?}, bias {:?} do not fit", l1.shape(), l2.shape(), l3.shape())
        }
        if rows <= FEW_ROWS {
            return Ok((CpuStorage::F32(linear_few_rows(x, rows, input, w, b)), Shape::from((rows, output))));
        }
        let mut y: Vec<f32> = b.iter().copied().cycle().take(rows * output).collect();
        sgemm(rows, output, input, &mut y, true, (x, input, 1), (w, 1, input));
        Ok((CpuStorage::F32(y), Shape::from((rows, output))))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.contiguous()?.apply_op2_no_bwd(&w.contiguous()?, &FrozenLinearInputGrad)?), None, None))
    }
}

/// The input gradient of [`FrozenLinear`]: `g·W` for g [rows, out], W [out, in].
struct FrozenLinearInputGrad;

impl CustomOp2 for FrozenLinearInputGrad {
    fn name(&self) -> &'static str {
        "frozen_linear_input_grad"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (g, w) = (contiguous_f32(s1, l1, "frozen_linear_input_grad")?, contiguous_f32(s2, l2, "frozen_linear_input_grad")?);
        let (rows, output) = l1.shape().dims2()?;
        let (w_output, input) = l2.shape().dims2()?;
        if w_output != output {
            candle_core::bail!("frozen_linear_input_grad: grad {:?} and weight {:?} do not fit", l1.shape(), l2.shape())
        }
        let mut dx = vec![0f32; rows * input];
        if rows <= FEW_ROWS {
            few_rows_times_weight(g, rows, output, w, input, &mut dx);
        } else {
            sgemm(rows, input, output, &mut dx, false, (g, output, 1), (w, input, 1));
        }
        Ok((CpuStorage::F32(dx), Shape::from((rows, input))))
    }
}

/// `dx = g·W` for a few rows of g [rows, out] and W [out, in], streaming W once: each job owns a
/// band of dx's columns and adds `g[r, o]·W[o, band]` for every o (no packing of W).
fn few_rows_times_weight(g: &[f32], rows: usize, output: usize, w: &[f32], input: usize, dx: &mut [f32]) {
    const COLUMNS_PER_JOB: usize = 256;
    let bands = input.div_ceil(COLUMNS_PER_JOB);
    let parts: Vec<Vec<f32>> = (0..bands)
        .into_par_iter()
        .map(|band| {
            let c0 = band * COLUMNS_PER_JOB;
            let width = COLUMNS_PER_JOB.min(input - c0);
            let mut part = vec![0f32; rows * width];
            for o in 0..output {
                let wo = &w[o * input + c0..][..width];
                for r in 0..rows {
                    let gv = g[r * output + o];
                    part[r * width..(r + 1) * width].iter_mut().zip(wo).for_each(|(d, wv)| *d += gv * wv);
                }
            }
            part
        })
        .collect();
    for (band, part) in parts.iter().enumerate() {
        let c0 = band * COLUMNS_PER_JOB;
        let width = part.len() / rows.max(1);
        for r in 0..rows {
            dx[r * input + c0..][..width].copy_from_slice(&part[r * width..(r + 1) * width]);
        }
    }
}

/// Rows up to which [`frozen_linear`] streams the weights itself instead of calling `sgemm`:
/// `sgemm` copies (packs) all of W before multiplying, which for a few rows (one image's test
/// views) costs more than the products; here each weight row is read once, straight from memory.
const FEW_ROWS: usize = 16;

/// `x·wᵀ + b` for a few rows (≤ 16) of x [rows, in], w [out, in], b [out]. x is transposed
/// once into columns of 8 or 16 lanes (rows padded with zeros), so that one AVX register holds
/// 8 rows' sums: a tile of J outputs keeps their sums for all rows in registers over the whole
/// input while each weight is broadcast once, and x's columns stay in cache for all tiles.
fn linear_few_rows(x: &[f32], rows: usize, input: usize, w: &[f32], b: &[f32]) -> Vec<f32> {
    const OUTPUTS_PER_JOB: usize = 24;
    let output = b.len();
    assert!(rows <= FEW_ROWS && x.len() == rows * input && w.len() == output * input);
    if rows == 0 || output == 0 || input == 0 {
        return b.iter().copied().cycle().take(rows * output).collect();
    }
    let lanes = rows.next_multiple_of(8);
    let mut xt = vec![0f32; input * lanes];
    for (r, row) in x.chunks_exact(input).enumerate() {
        for (k, v) in row.iter().enumerate() {
            xt[k * lanes + r] = *v;
        }
    }
    // the result transposed, [out, lanes], so that each job owns one contiguous part
    let mut yt = vec![0f32; output * lanes];
    yt.par_chunks_mut(OUTPUTS_PER_JOB * lanes).enumerate().for_each(|(job, part)| {
        let j0 = job * OUTPUTS_PER_JOB;
        let w = &w[j0 * input..(j0 + part.len() / lanes) * input];
        #[cfg(target_arch = "x86_64")]
        if has_avx2_fma() {
            // SAFETY: features detected; w holds part.len()/lanes rows of `input`, xt `input`
            // columns of `lanes`.
            return unsafe { few_rows_job_avx2(&xt, lanes, w, input, part) };
        }
        for (yj, wj) in part.chunks_exact_mut(lanes).zip(w.chunks_exact(input)) {
            for (k, wv) in wj.iter().enumerate() {
                yj.iter_mut().zip(&xt[k * lanes..(k + 1) * lanes]).for_each(|(y, xv)| *y += wv * xv);
            }
        }
    });
    let mut y = vec![0f32; rows * output];
    for (o, (col, bias)) in yt.chunks(lanes).zip(b).enumerate() {
        for (r, v) in col[..rows].iter().enumerate() {
            y[r * output + o] = v + bias;
        }
    }
    y
}

/// One job of [`linear_few_rows`]: `part` [outs, lanes] = w [outs, input] · xt [input, lanes],
/// in tiles of 6 outputs (16 lanes) or 12 outputs (8 lanes), the last outputs one at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn few_rows_job_avx2(xt: &[f32], lanes: usize, w: &[f32], input: usize, part: &mut [f32]) {
    assert!(xt.len() >= input * lanes && w.len() * lanes == part.len() * input);
    let outs = part.len() / lanes;
    let (xt, w, y) = (xt.as_ptr(), w.as_ptr(), part.as_mut_ptr());
    match lanes {
        16 => outer_tiles::<6, 2>(xt, w, input, y, outs),
        _ => outer_tiles::<12, 1>(xt, w, input, y, outs),
    }
}

/// `outs` outputs as tiles of J, the last ones one at a time (see [`outer_tile`]).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn outer_tiles<const J: usize, const V: usize>(xt: *const f32, w: *const f32, input: usize, y: *mut f32, outs: usize) {
    let mut j = 0;
    while j + J <= outs {
        outer_tile::<J, V>(xt, w.add(j * input), input, y.add(j * 8 * V));
        j += J;
    }
    while j < outs {
        outer_tile::<1, V>(xt, w.add(j * input), input, y.add(j * 8 * V));
        j += 1;
    }
}

/// J outputs × 8V lanes: `y[q·8V + l] = Σ_k w[q·input + k] · xt[k·8V + l]`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn outer_tile<const J: usize, const V: usize>(xt: *const f32, w: *const f32, input: usize, y: *mut f32) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_ps(); V]; J];
    for k in 0..input {
        let mut xv = [_mm256_setzero_ps(); V];
        for (v, xr) in xv.iter_mut().enumerate() {
            *xr = _mm256_loadu_ps(xt.add(k * 8 * V + 8 * v));
        }
        for (q, row) in acc.iter_mut().enumerate() {
            let wb = _mm256_broadcast_ss(&*w.add(q * input + k));
            for v in 0..V {
                row[v] = _mm256_fmadd_ps(wb, xv[v], row[v]);
            }
        }
    }
    for (q, row) in acc.iter().enumerate() {
        for (v, a) in row.iter().enumerate() {
            _mm256_storeu_ps(y.add(q * 8 * V + 8 * v), *a);
        }
    }
}

/// `x·weightᵀ + bias` for x [B, in], weight [out, in], bias [out], without gradient tracking.
pub fn frozen_linear(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op3_no_bwd(&weight.contiguous()?, &bias.contiguous()?, &FrozenLinear)
}

/// [`frozen_linear`] in the graph of an input that needs a gradient: backward gives x's
/// gradient `g·weight` and none for the (frozen) parameters.
pub fn frozen_linear_tracked(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op3(&weight.detach().contiguous()?, &bias.detach().contiguous()?, FrozenLinear)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn frozen_linear_input_gradient_matches_autograd_and_leaves_the_parameters_alone() -> Result<()> {
        let dev = Device::Cpu;
        let (input, output) = (300, 70);
        let w = Var::from_vec((0..output * input).map(|i| ((i * 37 % 101) as f32 - 50.0) / 97.0).collect(), (output, input), &dev)?;
        let b = Var::from_vec((0..output).map(|i| i as f32 * 0.01).collect(), output, &dev)?;
        // 3 rows: the streaming path; 20: sgemm
        for rows in [3, 20] {
            let xv: Vec<f32> = (0..rows * input).map(|i| ((i * 13 % 29) as f32 - 14.0) / 7.0).collect();
            let weights: Tensor = Tensor::from_vec((0..rows * output).map(|i| (i % 5) as f32 - 2.0).collect(), (rows, output), &dev)?;
            let x = Var::from_vec(xv.clone(), (rows, input), &dev)?;
            let y = frozen_linear_tracked(x.as_tensor(), w.as_tensor(), b.as_tensor())?;
            let g = (y.clone() * &weights)?.sum_all()?.backward()?;
            let reference = Var::from_vec(xv, (rows, input), &dev)?;
            let y_ref = reference.as_tensor().matmul(&w.as_tensor().t()?)?.broadcast_add(b.as_tensor())?;
            let g_ref = (y_ref.clone() * &weights)?.sum_all()?.backward()?;
            let diff = (y - y_ref)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-4, "forward differs by {diff}");
            let (dx, dx_ref) = (g.get(&x).unwrap(), g_ref.get(&reference).unwrap());
            let diff = (dx - dx_ref)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-4, "input gradient differs by {diff} at {rows} rows");
            assert!(g.get(&w).is_none() && g.get(&b).is_none(), "frozen parameters got a gradient");
        }
        Ok(())
    }

    #[test]
    fn frozen_linear_matches_the_definition_for_few_and_many_rows() -> Result<()> {
        // up to 16 rows take `linear_few_rows` (8 lanes for 1-8 rows, 16 for 9-16; 13 outputs =
        // whole tiles of 12 or 6 and then single outputs), more rows take `sgemm`
        let (input, output) = (27, 13);
        let w: Vec<f32> = (0..output * input).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
        let b: Vec<f32> = (0..output).map(|i| i as f32 * 0.25 - 1.0).collect();
        for rows in [1, 2, 3, 5, 7, 16, 17, 40] {
            let x: Vec<f32> = (0..rows * input).map(|i| ((i * 53 % 97) as f32 - 48.0) / 48.0).collect();
            let dev = &candle_core::Device::Cpu;
            let got = frozen_linear(
                &Tensor::from_slice(&x, (rows, input), dev)?,
                &Tensor::from_slice(&w, (output, input), dev)?,
                &Tensor::from_slice(&b, output, dev)?,
            )?;
            assert_eq!(got.dims(), &[rows, output]);
            let got = got.flatten_all()?.to_vec1::<f32>()?;
            for r in 0..rows {
                for o in 0..output {
                    let want = b[o] + (0..input).map(|i| x[r * input + i] * w[o * input + i]).sum::<f32>();
                    assert!((got[r * output + o] - want).abs() < 1e-4, "rows {rows}, ({r}, {o}): {} vs {want}", got[r * output + o]);
                }
            }
        }
        Ok(())
    }
}
