//! Single-precision matrix product for the whole crate: the system's OpenBLAS when it is installed
//! (loaded at run time, so the same binary runs without it), the pure-Rust `gemm` crate otherwise.
//!
//! OpenBLAS runs single-threaded; large products are split over rayon's threads by columns here,
//! and a call from inside a rayon job stays on that job's thread (no oversubscription).
//! `DIFFERNET_SGEMM=rust` forces the pure-Rust path.

use std::sync::OnceLock;

/// Row-major view of a matrix: (data, row stride, column stride).
pub type Mat<'a> = (&'a [f32], usize, usize);

/// Which implementation computes the products.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// Debian's `libopenblas0` (`libopenblas.so.0`), loaded with `dlopen`.
    OpenBlas,
    /// The `gemm` crate (pure Rust), always available.
    Rust,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::OpenBlas => "openblas",
            Backend::Rust => "gemm crate (pure Rust)",
        }
    }
}

type CblasSgemm = unsafe extern "C" fn(i32, i32, i32, i32, i32, i32, f32, *const f32, i32, *const f32, i32, f32, *mut f32, i32);

fn openblas() -> Option<CblasSgemm> {
    static LIB: OnceLock<Option<CblasSgemm>> = OnceLock::new();
    *LIB.get_or_init(|| {
        if std::env::var("DIFFERNET_SGEMM").is_ok_and(|v| v == "rust") {
            return None;
        }
        choose_openblas_core();
        for name in [c"libopenblas.so.0", c"libopenblas.so"] {
            // SAFETY: dlopen/dlsym with NUL-terminated names; the library stays loaded for the
            // process's life (never dlclosed), so the function pointers remain valid.
            unsafe {
                let lib = libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
                if lib.is_null() {
                    continue;
                }
                let sgemm = libc::dlsym(lib, c"cblas_sgemm".as_ptr());
                let threads = libc::dlsym(lib, c"openblas_set_num_threads".as_ptr());
                if sgemm.is_null() || threads.is_null() {
                    continue;
                }
                let set_threads: unsafe extern "C" fn(i32) = std::mem::transmute(threads);
                set_threads(1);
                tracing::debug!("sgemm: using OpenBLAS ({})", name.to_string_lossy());
                return Some(std::mem::transmute::<*mut libc::c_void, CblasSgemm>(sgemm));
            }
        }
        None
    })
}

/// OpenBLAS's dynamic build reads `OPENBLAS_CORETYPE` when it is loaded. Left unset, Debian's
/// 0.3.21 picks its generic `Prescott` kernels on AVX-512 VMs whose CPU model it does not know
/// (measured on a 2-vCPU "Intel Xeon Processor": 2048³ sgemm 159 GFLOP/s, against 305 with
/// `SkylakeX`, `differnet bench`); so on a CPU with AVX-512 F/BW/DQ/VL it is set to `SKYLAKEX`
/// unless the user set it. Other CPUs keep OpenBLAS's own choice.
fn choose_openblas_core() {
    #[cfg(target_arch = "x86_64")]
    if std::env::var_os("OPENBLAS_CORETYPE").is_none()
        && std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512dq")
        && std::arch::is_x86_feature_detected!("avx512vl")
    {
        // the CLI loads OpenBLAS at start-up (`backend()`), before any other thread reads the
        // environment
        std::env::set_var("OPENBLAS_CORETYPE", "SKYLAKEX");
        tracing::debug!("sgemm: OPENBLAS_CORETYPE=SKYLAKEX (AVX-512)");
    }
}

/// The implementation `sgemm` uses in this process.
pub fn backend() -> Backend {
    if openblas().is_some() {
        Backend::OpenBlas
    } else {
        Backend::Rust
    }
}

/// dst[m×n] (row-major, row stride n) = (acc ? dst : 0) + A[m×k]·B[k×n], with `backend()`.
pub fn sgemm(m: usize, n: usize, k: usize, dst: &mut [f32], acc: bool, a: Mat, b: Mat) {
    sgemm_with(backend(), m, n, k, dst, acc, a, b)
}

/// A raw pointer shared by rayon jobs that write disjoint column ranges of one matrix.
#[derive(Clone, Copy)]
struct Columns(*mut f32);
unsafe impl Send for Columns {}
unsafe impl Sync for Columns {}

/// `sgemm` on a chosen backend (the benchmark compares both; OpenBLAS falls back to Rust when absent).
#[allow(clippy::too_many_arguments)]
pub fn sgemm_with(backend: Backend, m: usize, n: usize, k: usize, dst: &mut [f32], acc: bool, a: Mat, b: Mat) {
    assert!(dst.len() >= m * n, "sgemm: destination holds {} values, needs {m}x{n}", dst.len());
    assert!(m == 0 || k == 0 || a.0.len() > (m - 1) * a.1 + (k - 1) * a.2, "sgemm: A too short for {m}x{k}");
    assert!(k == 0 || n == 0 || b.0.len() > (k - 1) * b.1 + (n - 1) * b.2, "sgemm: B too short for {k}x{n}");
    if m == 0 || n == 0 {
        return;
    }
    let threads = rayon::current_num_threads();
    // split large products over the threads, unless called from a job that already has its own
    let large = m * n * k > 1 << 18 && threads > 1 && rayon::current_thread_index().is_none();
    let blas = match backend {
        Backend::OpenBlas => openblas().and_then(|f| Some((f, cblas_layout(a, m, k)?, cblas_layout(b, k, n)?))),
        Backend::Rust => None,
    };
    let Some((f, (ta, lda), (tb, ldb))) = blas else {
        let par = if large { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
        // SAFETY: the asserts above keep every index inside the three buffers.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                dst.as_mut_ptr(),
                1,
                n as isize,
                acc,
                a.0.as_ptr(),
                a.2 as isize,
                a.1 as isize,
                b.0.as_ptr(),
                b.2 as isize,
                b.1 as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                par,
            )
        }
        return;
    };
    let ldc = n;
    let c = Columns(dst.as_mut_ptr());
    // One single-threaded OpenBLAS call for columns [j0, j0 + cols) of C.
    let block = |j0: usize, cols: usize| {
        // capture the whole `Columns` (Send + Sync), not its raw pointer field
        #[allow(clippy::redundant_locals)]
        let c = c;
        // SAFETY: columns j0..j0+cols of B and C lie inside their buffers (asserts above); jobs
        // write disjoint column ranges of C.
        unsafe {
            f(
                101,
                ta,
                tb,
                m as i32,
                cols as i32,
                k as i32,
                1.0,
                a.0.as_ptr(),
                lda,
                b.0.as_ptr().add(j0 * b.2),
                ldb,
                if acc { 1.0 } else { 0.0 },
                c.0.add(j0),
                ldc as i32,
            )
        }
    };
    if large && n >= 32 * threads {
        use rayon::prelude::*;
        // column blocks in multiples of 16 (the kernels' width), one per thread
        let per = n.div_ceil(threads).div_ceil(16) * 16;
        (0..n.div_ceil(per)).into_par_iter().for_each(|t| block(t * per, per.min(n - t * per)));
    } else {
        block(0, n);
    }
}

/// CBLAS transpose flag and leading dimension of a row-major `rows`×`cols` view, when CBLAS can
/// take it: one unit stride, a valid leading dimension, sizes that fit its `int`s.
fn cblas_layout(x: Mat, rows: usize, cols: usize) -> Option<(i32, i32)> {
    const NO_TRANS: i32 = 111;
    const TRANS: i32 = 112;
    let (flag, ld, least) = match (x.1, x.2) {
        (rs, 1) => (NO_TRANS, rs, cols),
        (1, cs) => (TRANS, cs, rows),
        _ => return None,
    };
    let fits = |v: usize| i32::try_from(v).is_ok();
    (ld >= least.max(1) && fits(ld) && fits(rows) && fits(cols) && fits(x.0.len())).then_some((flag, ld as i32))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(m: usize, n: usize, k: usize, a: Mat, b: Mat) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|p| a.0[i * a.1 + p * a.2] * b.0[p * b.1 + j * b.2]).sum();
            }
        }
        out
    }

    #[test]
    fn both_backends_match_the_definition_for_every_layout() {
        let (m, n, k) = (70, 300, 90);
        let av: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
        let bv: Vec<f32> = (0..k * n).map(|i| ((i * 53 % 97) as f32 - 48.0) / 48.0).collect();
        for backend in [Backend::OpenBlas, Backend::Rust] {
            for (a, b) in [((&av[..], k, 1), (&bv[..], n, 1)), ((&av[..], 1, m), (&bv[..], 1, k))] {
                let want = naive(m, n, k, a, b);
                for acc in [false, true] {
                    let mut got = vec![1f32; m * n];
                    sgemm_with(backend, m, n, k, &mut got, acc, a, b);
                    let shift = if acc { 1.0 } else { 0.0 };
                    let err = got.iter().zip(&want).map(|(g, w)| (g - w - shift).abs()).fold(0f32, f32::max);
                    assert!(err < 1e-3, "{backend:?} acc={acc}: max error {err}");
                }
            }
        }
    }
}
