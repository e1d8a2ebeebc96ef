//! The CPU kernels candle lacks or runs slowly, one file per family, each AVX2 path beside its
//! portable twin: matrix products, Winograd and direct convolutions, MBConv, pooling, atan, frozen linear.

pub mod atan;
pub mod direct_conv;
pub mod frozen_linear;
pub mod mbconv;
pub mod pointwise;
pub mod pooling;
pub mod sgemm;
pub mod winograd;

pub use atan::atan;
pub use direct_conv::{dense_conv2d, depthwise_conv2d};
pub use frozen_linear::{frozen_linear, frozen_linear_tracked};
pub use mbconv::{mbconv_fused, MbConvWeights, WeightsAndBias};
pub use pointwise::pointwise_conv;
pub use pooling::{max_pool2d, subsample};

use candle_core::{CpuStorage, Layout, Result};

/// The f32 values of a contiguous CPU tensor, or an error naming `op`.
pub(crate) fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else { candle_core::bail!("{op}: only f32 tensors are supported") };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

/// Whether this processor has AVX2 and FMA (checked once).
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx2_fma() -> bool {
    static FAST: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FAST.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

/// Whether this processor has AVX-512 F, BW, DQ and VL (checked once).
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx512() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512dq")
            && is_x86_feature_detected!("avx512vl")
    })
}

/// The widest vector instruction set this processor offers of those the kernels and the two
/// matrix-product backends dispatch on: "avx512", "avx2+fma" or "portable".
pub fn isa() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx512() {
            return "avx512";
        }
        if has_avx2_fma() {
            return "avx2+fma";
        }
    }
    "portable"
}

/// The instruction set this crate's own kernels (convolutions, MBConv, pooling, atan) run with
/// here: their AVX2 paths where the CPU has AVX2 and FMA (AVX-512 CPUs included), else portable.
pub fn kernels_isa() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        return "avx2+fma";
    }
    "portable"
}

/// The processor's model name (Linux's `/proc/cpuinfo`), or "unknown CPU".
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| t.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split(':').nth(1)).map(|m| m.trim().to_string()))
        .unwrap_or_else(|| "unknown CPU".into())
}

/// A raw pointer that may be shared by rayon jobs writing disjoint parts of one buffer.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut(pub(crate) *mut f32);
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}
impl SharedMut {
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// Largest absolute difference of two tensors of the same shape (the kernels' tests).
#[cfg(test)]
pub(crate) fn max_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> candle_core::Result<f32> {
    (a - b)?.abs()?.max_all()?.to_scalar::<f32>()
}
