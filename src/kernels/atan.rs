//! `atan` as a CPU custom op with its backward pass: the flow's soft clamp of the coupling
//! blocks' log-scales (paper eq. 4's clamp) runs through it.

use super::contiguous_f32;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

struct Atan;

impl CustomOp1 for Atan {
    fn name(&self) -> &'static str {
        "atan"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, "atan")?;
        Ok((CpuStorage::F32(x.iter().map(|v| v.atan()).collect()), l.shape().clone()))
    }
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // d/dx atan(x) = 1 / (1 + x^2)
        Ok(Some(grad.div(&(arg.sqr()? + 1.0)?)?))
    }
}

/// Element-wise arctangent with gradient.
pub fn atan(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Atan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn atan_matches_std_and_its_gradient_is_one_over_one_plus_x2() -> Result<()> {
        let xs = [-5f32, -0.5, 0.0, 0.3, 2.0, 40.0];
        let x = Var::new(&xs[..], &Device::Cpu)?;
        let y = atan(x.as_tensor())?;
        for (a, b) in y.to_vec1::<f32>()?.iter().zip(xs) {
            assert_eq!(*a, b.atan());
        }
        let g = y.sum_all()?.backward()?;
        let gx = g.get(&x).unwrap().to_vec1::<f32>()?;
        for (a, b) in gx.iter().zip(xs) {
            assert!((a - 1.0 / (1.0 + b * b)).abs() < 1e-7);
        }
        Ok(())
    }
}
