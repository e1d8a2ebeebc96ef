//! Single-precision matrix product for the whole crate, on whichever of two backends measured
//! faster on this machine for the product's shape: the system's OpenBLAS (loaded at run time, so
//! the same binary runs without it) or the pure-Rust `gemm` crate.
//!
//! OpenBLAS runs single-threaded; large products are split over rayon's threads by columns here,
//! and a call from inside a rayon job stays on that job's thread (no oversubscription). The
//! choice per shape class ([`ShapeClass`]) is measured once ([`choice`], [`init`]: a few hundred
//! ms, cached per machine by the CLI); `DIFFERNET_SGEMM=rust` or `=openblas` forces one backend.

use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::OnceLock;
use std::time::Instant;

/// Row-major view of a matrix: (data, row stride, column stride).
pub type Mat<'a> = (&'a [f32], usize, usize);

/// Which implementation computes the products.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
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

/// Products grouped by how the two backends compare on them, each measured on the shape of the
/// crate's own largest user of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShapeClass {
    /// Split over the threads, at most 256 rows or columns: the flow's layers on a batch (96 × 2048 × 576,
    /// weights transposed), the frozen flow scoring views.
    Rows,
    /// Split, more rows and columns, an inner dimension of at most 256: the flow's weight gradients
    /// (2048 × 576 × 96, the batch as inner dimension).
    Outer,
    /// Split, every dimension above 256 (1024³).
    Square,
    /// On one thread: small products, and products called from inside a rayon job (the
    /// Winograd convolution's per-tile products, 256 × 196 × 384).
    OneThread,
}

impl ShapeClass {
    pub const ALL: [ShapeClass; 4] = [ShapeClass::Rows, ShapeClass::Outer, ShapeClass::Square, ShapeClass::OneThread];

    /// The class of an m×k by k×n product run split over threads or not.
    pub fn of(m: usize, n: usize, k: usize, split: bool) -> Self {
        if !split {
            ShapeClass::OneThread
        } else if m.min(n) <= 256 {
            ShapeClass::Rows
        } else if k <= 256 {
            ShapeClass::Outer
        } else {
            ShapeClass::Square
        }
    }

    /// The product the class is measured on: (m, n, k, A's strides, B's strides, split).
    fn probe(self) -> (usize, usize, usize, (usize, usize), (usize, usize), bool) {
        match self {
            ShapeClass::Rows => (96, 2048, 576, (576, 1), (1, 576), true),
            ShapeClass::Outer => (2048, 576, 96, (1, 2048), (576, 1), true),
            ShapeClass::Square => (1024, 1024, 1024, (1024, 1), (1024, 1), true),
            ShapeClass::OneThread => (256, 196, 384, (384, 1), (196, 1), false),
        }
    }
}

/// One shape class's measurement and the backend chosen for it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClassChoice {
    pub class: ShapeClass,
    /// Best of several runs of the class's probe product, GFLOP/s (0 when not measured).
    pub openblas_gflops: f64,
    pub rust_gflops: f64,
    pub backend: Backend,
}

/// The backend of every shape class in this process, and what the choice rests on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Choice {
    /// What the measurement holds for: CPU, instruction set, threads, OpenBLAS build and core,
    /// this library's version. A cached choice for another machine is measured anew.
    pub machine: String,
    pub classes: Vec<ClassChoice>,
    /// "measured", "cached in PATH", "forced by DIFFERNET_SGEMM", "OpenBLAS is not installed".
    #[serde(skip)]
    pub how: String,
}

/// The Rust backend is chosen for a class only when it is at least this much faster: two runs on
/// one machine then rarely choose differently, so models trained with the same seed stay equal.
pub const RUST_MARGIN: f64 = 1.15;

impl Choice {
    pub fn backend_for(&self, class: ShapeClass) -> Backend {
        self.classes.iter().find(|c| c.class == class).map_or(Backend::Rust, |c| c.backend)
    }

    fn uniform(backend: Backend, machine: String, how: String) -> Self {
        let classes = ShapeClass::ALL.iter().map(|&class| ClassChoice { class, openblas_gflops: 0.0, rust_gflops: 0.0, backend }).collect();
        Choice { machine, classes, how }
    }

    /// Times both backends on every class's probe product, alternating them so that both see
    /// the same state of the machine (a few hundred ms in all).
    ///
    /// It runs on a thread of its own with a pool of its own (as many threads as rayon's global
    /// one), and the caller waits in a plain join. Products called from global rayon jobs wait on
    /// [`choice`] while this runs: probes on the global pool would deadlock once every worker
    /// waits, and a global worker that measured itself would, while waiting for its probes, run
    /// such a job and wait on its own initialization.
    pub fn measure(machine: String) -> Self {
        let threads = rayon::current_num_threads();
        let name = machine.clone();
        let run = move || -> std::result::Result<Self, String> {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().map_err(|e| e.to_string())?;
            Ok(pool.install(|| Self::measure_here(machine)))
        };
        let measured = std::thread::Builder::new()
            .name("sgemm-measure".into())
            .spawn(run)
            .map_err(|e| e.to_string())
            .and_then(|h| h.join().map_err(|_| "the measurement panicked".to_string())?);
        measured.unwrap_or_else(|e| {
            tracing::warn!("sgemm: backends not measured ({e}); OpenBLAS for every product");
            Self::uniform(Backend::OpenBlas, name, format!("not measured: {e}"))
        })
    }

    fn measure_here(machine: String) -> Self {
        let probes: Vec<Probe> = ShapeClass::ALL.iter().map(|&c| Probe::new(c)).collect();
        // one warm-up round: the thread pool, page faults, the clock's ramp
        for p in &probes {
            p.run(Backend::OpenBlas);
            p.run(Backend::Rust);
        }
        let classes = probes
            .iter()
            .map(|p| {
                let (mut blas, mut rust, mut spent, mut rounds) = (f64::INFINITY, f64::INFINITY, 0.0, 0);
                while rounds < 3 || (spent < PROBE_SECONDS && rounds < 50) {
                    let (b, r) = (p.run(Backend::OpenBlas), p.run(Backend::Rust));
                    (blas, rust, spent, rounds) = (blas.min(b), rust.min(r), spent + b + r, rounds + 1);
                }
                let (openblas_gflops, rust_gflops) = (p.flops / blas / 1e9, p.flops / rust / 1e9);
                let backend = faster(openblas_gflops, rust_gflops);
                ClassChoice { class: p.class, openblas_gflops, rust_gflops, backend }
            })
            .collect();
        Choice { machine, classes, how: "measured".into() }
    }
}

/// The backend a class gets from its two rates: OpenBLAS unless Rust is [`RUST_MARGIN`] faster.
pub fn faster(openblas_gflops: f64, rust_gflops: f64) -> Backend {
    if rust_gflops >= RUST_MARGIN * openblas_gflops {
        Backend::Rust
    } else {
        Backend::OpenBlas
    }
}

/// Seconds of products each class's measurement runs for (at least 3 rounds of both backends).
const PROBE_SECONDS: f64 = 0.06;

/// A class's probe product with its operands.
struct Probe {
    class: ShapeClass,
    a: Vec<f32>,
    b: Vec<f32>,
    c: std::cell::RefCell<Vec<f32>>,
    flops: f64,
}

impl Probe {
    fn new(class: ShapeClass) -> Self {
        let (m, n, k, ..) = class.probe();
        let a = (0..m * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
        let b = (0..k * n).map(|i| ((i * 53 % 97) as f32 - 48.0) / 48.0).collect();
        Probe { class, a, b, c: vec![0f32; m * n].into(), flops: 2.0 * (m * n * k) as f64 }
    }

    /// Seconds of one product on `backend`.
    fn run(&self, backend: Backend) -> f64 {
        let (m, n, k, sa, sb, split) = self.class.probe();
        let t = Instant::now();
        product(backend, split, m, n, k, &mut self.c.borrow_mut(), false, (&self.a, sa.0, sa.1), (&self.b, sb.0, sb.1));
        t.elapsed().as_secs_f64()
    }
}

/// The loaded OpenBLAS: its `cblas_sgemm` and what it says of itself.
struct OpenBlas {
    sgemm: CblasSgemm,
    /// `openblas_get_config()` and `openblas_get_corename()`, e.g. "OpenBLAS 0.3.21 DYNAMIC_ARCH ... / skylakex".
    about: String,
}

type CblasSgemm = unsafe extern "C" fn(i32, i32, i32, i32, i32, i32, f32, *const f32, i32, *const f32, i32, f32, *mut f32, i32);

fn openblas() -> Option<&'static OpenBlas> {
    static LIB: OnceLock<Option<OpenBlas>> = OnceLock::new();
    LIB.get_or_init(|| {
        if std::env::var("DIFFERNET_SGEMM").is_ok_and(|v| v == "rust") {
            return None;
        }
        choose_openblas_core();
        for name in [c"libopenblas.so.0", c"libopenblas.so"] {
            // SAFETY: dlopen/dlsym with NUL-terminated names; the library stays loaded for the
            // process's life (never dlclosed), so the function pointers remain valid; the two
            // strings it returns are NUL-terminated static buffers of the library.
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
                let text = |symbol: &std::ffi::CStr| {
                    let f = libc::dlsym(lib, symbol.as_ptr());
                    if f.is_null() {
                        return String::from("?");
                    }
                    let f: unsafe extern "C" fn() -> *const libc::c_char = std::mem::transmute(f);
                    let s = f();
                    if s.is_null() {
                        String::from("?")
                    } else {
                        std::ffi::CStr::from_ptr(s).to_string_lossy().trim().to_string()
                    }
                };
                let about = format!("{} / {}", text(c"openblas_get_config"), text(c"openblas_get_corename"));
                tracing::debug!("sgemm: OpenBLAS loaded ({}: {about})", name.to_string_lossy());
                return Some(OpenBlas { sgemm: std::mem::transmute::<*mut libc::c_void, CblasSgemm>(sgemm), about });
            }
        }
        None
    })
    .as_ref()
}

/// OpenBLAS's dynamic build reads `OPENBLAS_CORETYPE` when it is loaded. Left unset, Debian's
/// 0.3.21 picks its generic `Prescott` kernels on AVX-512 VMs whose CPU model it does not know
/// (measured on a 2-vCPU "Intel Xeon Processor": 2048³ sgemm 159 GFLOP/s, against 305 with
/// `SkylakeX`, `differnet bench`); so on a CPU with AVX-512 F/BW/DQ/VL it is set to `SKYLAKEX`
/// unless the user set it. Other CPUs keep OpenBLAS's own choice.
fn choose_openblas_core() {
    #[cfg(target_arch = "x86_64")]
    if std::env::var_os("OPENBLAS_CORETYPE").is_none() && super::has_avx512() {
        // the CLI loads OpenBLAS at start-up (`init`), before any other thread reads the
        // environment
        std::env::set_var("OPENBLAS_CORETYPE", "SKYLAKEX");
        tracing::debug!("sgemm: OPENBLAS_CORETYPE=SKYLAKEX (AVX-512)");
    }
}

/// Whether OpenBLAS was found and loaded (never when `DIFFERNET_SGEMM=rust`).
pub fn openblas_loaded() -> bool {
    openblas().is_some()
}

/// What a choice measured here holds for (see [`Choice::machine`]).
pub fn machine() -> String {
    let (cpu, isa) = (super::cpu_model(), super::isa());
    let blas = openblas().map_or_else(|| "no OpenBLAS".to_string(), |o| o.about.clone());
    format!("{cpu} | {isa} | {} threads | {blas} | differnet {}", rayon::current_num_threads(), env!("CARGO_PKG_VERSION"))
}

static CHOICE: OnceLock<Choice> = OnceLock::new();

/// This process's choice of backends: [`init`]'s, or measured now without a cache file.
pub fn choice() -> &'static Choice {
    CHOICE.get_or_init(|| decide(None))
}

/// Sets this process's choice from `cache_file` when it holds one for this machine, else
/// measures it and writes it there (atomically; a failed write only logs). Call it early, on the
/// main thread: OpenBLAS reads its environment when loaded. Later calls return the first choice.
pub fn init(cache_file: Option<&Path>) -> &'static Choice {
    CHOICE.get_or_init(|| decide(cache_file))
}

fn decide(cache_file: Option<&Path>) -> Choice {
    let forced = std::env::var("DIFFERNET_SGEMM").ok();
    let loaded = openblas().is_some();
    let machine = machine();
    let choice = match forced.as_deref() {
        Some("rust") => Choice::uniform(Backend::Rust, machine, "forced by DIFFERNET_SGEMM=rust".into()),
        Some("openblas") if loaded => Choice::uniform(Backend::OpenBlas, machine, "forced by DIFFERNET_SGEMM=openblas".into()),
        _ if !loaded => Choice::uniform(Backend::Rust, machine, "OpenBLAS is not installed".into()),
        _ => match cache_file.and_then(|p| read_cached(p, &machine)) {
            Some(c) => c,
            None => {
                let c = Choice::measure(machine);
                if let Some(p) = cache_file {
                    let json = serde_json::to_vec_pretty(&c).expect("a choice serializes");
                    if let Err(e) = crate::error::write_atomic(p, &json) {
                        tracing::debug!("sgemm: the backend choice was not cached: {e}");
                    }
                }
                c
            }
        },
    };
    if let Some(v) = forced.as_deref().filter(|v| !["rust", "openblas"].contains(v)) {
        tracing::warn!("DIFFERNET_SGEMM={v} is neither `rust` nor `openblas`: ignored");
    }
    for c in &choice.classes {
        tracing::debug!(class = ?c.class, backend = c.backend.name(), openblas = c.openblas_gflops, rust = c.rust_gflops, how = %choice.how, "sgemm backend");
    }
    choice
}

fn read_cached(path: &Path, machine: &str) -> Option<Choice> {
    let mut c: Choice = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    let complete = ShapeClass::ALL.iter().all(|k| c.classes.iter().any(|x| x.class == *k));
    (c.machine == machine && complete).then(|| {
        c.how = format!("cached in {}", path.display());
        c
    })
}

/// dst[m×n] (row-major, row stride n) = (acc ? dst : 0) + A[m×k]·B[k×n], on the backend
/// [`choice`] gives the product's [`ShapeClass`].
pub fn sgemm(m: usize, n: usize, k: usize, dst: &mut [f32], acc: bool, a: Mat, b: Mat) {
    let split = splits(m, n, k);
    product(choice().backend_for(ShapeClass::of(m, n, k, split)), split, m, n, k, dst, acc, a, b)
}

/// Whether a product is split over the threads: large, and not called from a job that already
/// has its own thread.
fn splits(m: usize, n: usize, k: usize) -> bool {
    m * n * k > 1 << 18 && rayon::current_num_threads() > 1 && rayon::current_thread_index().is_none()
}

/// A raw pointer shared by rayon jobs that write disjoint column ranges of one matrix.
#[derive(Clone, Copy)]
struct Columns(*mut f32);
unsafe impl Send for Columns {}
unsafe impl Sync for Columns {}

/// `sgemm` on a chosen backend (the benchmark compares both; OpenBLAS falls back to Rust when absent).
#[allow(clippy::too_many_arguments)]
pub fn sgemm_with(backend: Backend, m: usize, n: usize, k: usize, dst: &mut [f32], acc: bool, a: Mat, b: Mat) {
    product(backend, splits(m, n, k), m, n, k, dst, acc, a, b)
}

#[allow(clippy::too_many_arguments)]
fn product(backend: Backend, split: bool, m: usize, n: usize, k: usize, dst: &mut [f32], acc: bool, a: Mat, b: Mat) {
    assert!(dst.len() >= m * n, "sgemm: destination holds {} values, needs {m}x{n}", dst.len());
    assert!(m == 0 || k == 0 || a.0.len() > (m - 1) * a.1 + (k - 1) * a.2, "sgemm: A too short for {m}x{k}");
    assert!(k == 0 || n == 0 || b.0.len() > (k - 1) * b.1 + (n - 1) * b.2, "sgemm: B too short for {k}x{n}");
    if m == 0 || n == 0 {
        return;
    }
    let threads = rayon::current_num_threads();
    let blas = match backend {
        Backend::OpenBlas => openblas().and_then(|o| Some((o.sgemm, cblas_layout(a, m, k)?, cblas_layout(b, k, n)?))),
        Backend::Rust => None,
    };
    let Some((f, (ta, lda), (tb, ldb))) = blas else {
        let par = if split { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
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
    if split && n >= 32 * threads {
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

    #[test]
    fn the_rust_backend_matches_the_definition_for_every_tile_remainder() {
        // the gemm crate's AVX-512 micro-kernels (`x86-v4`) tile rows by up to 48 and columns
        // by up to 8: every remainder of both, on one thread and split, both operand layouts
        for k in [1, 7, 33] {
            for m in 1..=50 {
                for n in 1..=17 {
                    let av: Vec<f32> = (0..m * k).map(|i| ((i * 31 % 17) as f32 - 8.0) / 8.0).collect();
                    let bv: Vec<f32> = (0..k * n).map(|i| ((i * 13 % 11) as f32 - 5.0) / 5.0).collect();
                    for (a, b) in [((&av[..], k, 1), (&bv[..], n, 1)), ((&av[..], 1, m), (&bv[..], 1, k))] {
                        let want = naive(m, n, k, a, b);
                        for split in [false, true] {
                            let mut got = vec![0f32; m * n];
                            product(Backend::Rust, split, m, n, k, &mut got, false, a, b);
                            let err = got.iter().zip(&want).map(|(g, w)| (g - w).abs()).fold(0f32, f32::max);
                            assert!(err < 1e-4, "{m}x{n}x{k} split={split}: max error {err}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn each_product_of_the_crate_falls_in_the_class_measured_on_its_shape() {
        // the flow's forward, input gradient and weight gradient at batch 96, width 2048
        assert_eq!(ShapeClass::of(96, 2048, 576, true), ShapeClass::Rows);
        assert_eq!(ShapeClass::of(96, 576, 2048, true), ShapeClass::Rows);
        assert_eq!(ShapeClass::of(2048, 576, 96, true), ShapeClass::Outer);
        assert_eq!(ShapeClass::of(1152, 2048, 96, true), ShapeClass::Outer);
        assert_eq!(ShapeClass::of(1024, 1024, 1024, true), ShapeClass::Square);
        assert_eq!(ShapeClass::of(2048, 2048, 2048, false), ShapeClass::OneThread);
        for class in ShapeClass::ALL {
            let (m, n, k, _, _, split) = class.probe();
            assert_eq!(ShapeClass::of(m, n, k, split), class, "{class:?}'s probe is of another class");
        }
    }

    #[test]
    fn rust_is_chosen_only_when_clearly_faster() {
        assert_eq!(faster(100.0, 110.0), Backend::OpenBlas);
        assert_eq!(faster(100.0, 100.0 * RUST_MARGIN), Backend::Rust);
        assert_eq!(faster(300.0, 150.0), Backend::OpenBlas);
        assert_eq!(faster(75.0, 150.0), Backend::Rust);
    }

    #[test]
    fn measuring_needs_no_global_rayon_worker() {
        // every global worker busy until the measurement ends, as when each runs a product that
        // waits on `choice()` while another thread measures
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        use std::time::Duration;
        static STARTED: AtomicUsize = AtomicUsize::new(0);
        static DONE: AtomicBool = AtomicBool::new(false);
        let workers = std::thread::spawn(|| {
            rayon::broadcast(|_| {
                STARTED.fetch_add(1, Ordering::SeqCst);
                let t = Instant::now();
                while !DONE.load(Ordering::SeqCst) && t.elapsed() < Duration::from_secs(60) {
                    std::thread::sleep(Duration::from_millis(2));
                }
                DONE.load(Ordering::SeqCst)
            })
        });
        while STARTED.load(Ordering::SeqCst) < rayon::current_num_threads() {
            std::thread::sleep(Duration::from_millis(1));
        }
        let measured = Choice::measure(machine());
        DONE.store(true, Ordering::SeqCst);
        let waited_for_it = workers.join().unwrap();
        assert!(waited_for_it.iter().all(|&done| done), "the measurement waited for a busy global worker");
        assert_eq!(measured.classes.len(), ShapeClass::ALL.len());
    }

    #[test]
    fn a_global_worker_that_measures_runs_no_other_job_meanwhile() {
        // a global worker measuring must not pick up queued global jobs while it waits for its
        // probes: such a job may call `choice()` and wait on the initialization it is inside
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Mutex;
        static MEASURING: AtomicBool = AtomicBool::new(false);
        let measurer = Mutex::new(None);
        let nested = AtomicBool::new(false);
        rayon::scope(|s| {
            s.spawn(|_| {
                *measurer.lock().unwrap() = Some(std::thread::current().id());
                MEASURING.store(true, Ordering::SeqCst);
                let c = Choice::measure(machine());
                MEASURING.store(false, Ordering::SeqCst);
                assert_eq!(c.classes.len(), ShapeClass::ALL.len());
            });
            for _ in 0..64 {
                s.spawn(|_| {
                    if MEASURING.load(Ordering::SeqCst) && *measurer.lock().unwrap() == Some(std::thread::current().id()) {
                        nested.store(true, Ordering::SeqCst);
                    }
                    std::thread::sleep(std::time::Duration::from_millis(5));
                });
            }
        });
        assert!(!nested.load(Ordering::SeqCst), "the measuring worker ran another global job inside the measurement");
    }

    #[test]
    fn a_measured_choice_is_cached_for_this_machine_only() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sgemm-choice.json");
        let first = decide(Some(&file));
        if !openblas_loaded() {
            // nothing to measure: everything on Rust, nothing cached
            assert!(first.classes.iter().all(|c| c.backend == Backend::Rust) && !file.exists());
            return;
        }
        if std::env::var_os("DIFFERNET_SGEMM").is_some() {
            return;
        }
        assert_eq!(first.how, "measured");
        assert!(first.classes.iter().all(|c| c.openblas_gflops > 0.0 && c.rust_gflops > 0.0), "{first:?}");
        let again = decide(Some(&file));
        assert!(again.how.starts_with("cached in"), "{}", again.how);
        assert_eq!(again.classes, first.classes);
        // a file from another machine (or an older library) is measured anew
        let mut other = first.clone();
        other.machine.push_str(" (elsewhere)");
        std::fs::write(&file, serde_json::to_vec(&other).unwrap()).unwrap();
        assert!(read_cached(&file, &machine()).is_none());
        std::fs::write(&file, b"{ not json").unwrap();
        assert_eq!(decide(Some(&file)).how, "measured");
    }
}
