//! Model files: one safetensors file holding the flow parameters and, in its metadata, a JSON
//! manifest (versions, backbone and its weights checksum, hyperparameters, threshold, checksums).

use crate::backbone::BackboneKind;
use crate::error::{write_atomic, Error, Result};
use crate::features::local_density::{LocalDensity, LocalDensityInfo};
use crate::flow::train::{TrainConfig, TrainingSummary};
use crate::flow::{FlowConfig, NormalizingFlow};
use crate::score::ScoreKind;
use candle_core::{DType, Device};
use std::collections::HashMap;
use std::path::Path;

pub const FORMAT: &str = "differnet-model";
/// The format version of files whose flow is stored in f32 (readable by every build).
pub const FORMAT_VERSION: u32 = 1;
/// The format version of files whose flow is stored in f16 ([`FlowStorage::F16`]); builds that
/// read only version 1 refuse them by their version instead of misreading them.
pub const FORMAT_VERSION_F16: u32 = 2;
const MANIFEST_KEY: &str = "differnet_manifest";

/// The decision threshold θ of eq. 6 and how it was chosen.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Threshold {
    pub value: f64,
    /// `user`, `fpr=<rate> on <n> good images`, or `best-f1 on <n> labelled images`.
    pub method: String,
}

/// The range of anomaly scores of held-out good images (or of those `calibrate` saw): with the
/// threshold θ it gives anomalib's normalized score clamp((s − θ)/(max − min) + 0.5, 0, 1).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ScoreRange {
    pub min: f64,
    pub max: f64,
}

impl ScoreRange {
    /// The range of `scores` (`None` when empty or not finite).
    pub fn of(scores: &[f64]) -> Option<Self> {
        let (min, max) = scores.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &s| (a.min(s), b.max(s)));
        (min.is_finite() && max.is_finite()).then_some(ScoreRange { min, max })
    }

    /// `pred_score` of a score at threshold θ: 0.5 at θ, clamped to [0, 1].
    pub fn normalize(&self, score: f64, threshold: f64) -> f64 {
        ((score - threshold) / self.span(threshold) + 0.5).clamp(0.0, 1.0)
    }

    /// max − min, kept above rounding for a range of one score.
    pub fn span(&self, threshold: f64) -> f64 {
        (self.max - self.min).max(f64::EPSILON * threshold.abs().max(1.0))
    }
}

/// How an image's anomaly score is formed from what the model computes.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum ImageScore {
    /// The flow's score τ(x) alone (the paper's; models without held-out images).
    #[default]
    Flow,
    /// The flow's score and the feature map's maximum, each standardized by the mean and standard
    /// deviation of the held-out good images', summed: a small defect that global pooling washes
    /// out still raises the map's maximum.
    FlowAndMapMax(ScoreStandardization),
}

/// Means and standard deviations of the flow's score and of the feature map's maximum over good
/// images the flow was not fitted on.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ScoreStandardization {
    pub flow_mean: f64,
    pub flow_std: f64,
    pub map_max_mean: f64,
    pub map_max_std: f64,
    pub images: usize,
}

impl ScoreStandardization {
    /// From (flow score, map maximum) pairs of good images; `None` with fewer than 2 or when
    /// either spread is zero or not finite.
    pub fn of(pairs: &[(f64, f64)]) -> Option<Self> {
        let n = pairs.len();
        if n < 2 {
            return None;
        }
        let mean_std = |v: Vec<f64>| {
            let mean = v.iter().sum::<f64>() / n as f64;
            let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
            (mean, var.sqrt())
        };
        let (flow_mean, flow_std) = mean_std(pairs.iter().map(|p| p.0).collect());
        let (map_max_mean, map_max_std) = mean_std(pairs.iter().map(|p| p.1).collect());
        let ok = |m: f64, s: f64| m.is_finite() && s.is_finite() && s > 0.0;
        (ok(flow_mean, flow_std) && ok(map_max_mean, map_max_std)).then_some(ScoreStandardization {
            flow_mean,
            flow_std,
            map_max_mean,
            map_max_std,
            images: n,
        })
    }

    /// (flow − mean) / std + (map max − mean) / std.
    pub fn combine(&self, flow: f64, map_max: f64) -> f64 {
        (flow - self.flow_mean) / self.flow_std + (map_max - self.map_max_mean) / self.map_max_std
    }
}

/// How a model file stores the flow's parameters. Computation is always f32: f16 parameters are
/// widened when the file is read, and a flow is rounded to f16 before it is calibrated and saved
/// ([`FlowStorage::round`]), so a model scores the same before and after a reload.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FlowStorage {
    /// 4 bytes a parameter (a default EfficientNet-Lite0 model: 764 MB).
    #[default]
    F32,
    /// 2 bytes a parameter: half the file; scores within 1e-3 relative of the f32 flow's.
    F16,
}

impl FlowStorage {
    pub fn dtype(self) -> DType {
        match self {
            FlowStorage::F32 => DType::F32,
            FlowStorage::F16 => DType::F16,
        }
    }

    pub fn bytes_per_parameter(self) -> usize {
        self.dtype().size_in_bytes()
    }

    /// Rounds the flow's parameters to the values this storage keeps (f16: nearest, ties to
    /// even), so the flow in memory is the one a reload gives.
    pub fn round(self, flow: &NormalizingFlow) -> Result<()> {
        if self != FlowStorage::F32 {
            for (_, v) in flow.named_parameters() {
                v.set(&v.as_tensor().to_dtype(self.dtype())?.to_dtype(DType::F32)?)?;
            }
        }
        Ok(())
    }
}

/// What the model was trained on.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct TrainingData {
    pub root: String,
    pub n_images: usize,
    /// sha256 over the sorted per-image sha256s.
    pub images_sha256: String,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    pub library_version: String,
    pub backbone: BackboneKind,
    pub backbone_weights_sha256: String,
    pub flow: FlowConfig,
    pub permutations: Vec<Vec<u32>>,
    pub score: ScoreKind,
    /// Number of test views (rotations i·360/n).
    pub test_views: usize,
    pub train: TrainConfig,
    pub threshold: Option<Threshold>,
    /// How the image score is formed (the flow's alone in models written before this existed).
    #[serde(default)]
    pub image_score: ImageScore,
    /// Scores of good images the flow was not fitted on, for `pred_score`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score_range: Option<ScoreRange>,
    /// The local feature density behind feature maps, when the model has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_density: Option<LocalDensityInfo>,
    /// Range of good images' maps, for heat maps normalized against good parts.
    #[serde(default)]
    pub localization: Option<crate::localize::GoodMapRange>,
    pub training_data: TrainingData,
    pub training: TrainingSummary,
    /// How the flow's parameters are stored (f32 in files written before this existed).
    #[serde(default)]
    pub flow_storage: FlowStorage,
    /// sha256 over all parameter bytes (f32 little-endian, as computed with) in
    /// `named_parameters` order.
    pub parameters_sha256: String,
}

/// The safetensors header length, checked to be plausible and within the `available` bytes.
fn header_length(n: u64, available: u64, path: &Path) -> Result<usize> {
    if n > 100 << 20 {
        return Err(Error::Model { path: path.to_path_buf(), reason: "header length is implausible: not a differnet model file".into() });
    }
    if n > available {
        return Err(Error::Model { path: path.to_path_buf(), reason: "truncated header".into() });
    }
    Ok(n as usize)
}

/// The manifest in a safetensors JSON header.
fn manifest_from_header(header: &[u8], path: &Path) -> Result<Manifest> {
    let bad = |reason: String| Error::Model { path: path.to_path_buf(), reason };
    let v: serde_json::Value = serde_json::from_slice(header).map_err(|e| bad(format!("header is not JSON: {e}")))?;
    let text = v
        .get("__metadata__")
        .and_then(|m| m.get(MANIFEST_KEY))
        .and_then(|s| s.as_str())
        .ok_or_else(|| bad("no differnet manifest in the file (is it a differnet model?)".into()))?;
    let m: Manifest = serde_json::from_str(text).map_err(|e| bad(format!("manifest: {e}")))?;
    if m.format != FORMAT {
        return Err(bad(format!("format `{}` is not `{FORMAT}`", m.format)));
    }
    if !(FORMAT_VERSION..=FORMAT_VERSION_F16).contains(&m.format_version) {
        return Err(bad(format!(
            "format version {} is not supported (this build reads versions {FORMAT_VERSION} to {FORMAT_VERSION_F16})",
            m.format_version
        )));
    }
    Ok(m)
}

pub struct Model {
    pub manifest: Manifest,
    pub flow: NormalizingFlow,
    /// The density of local feature vectors (feature maps), when fitted.
    pub local: Option<LocalDensity>,
}

/// sha256 of the parameters' f32 values, in order (f16 ones widened first).
fn parameters_sha256<'a>(parameters: impl IntoIterator<Item = &'a candle_core::Tensor>) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for t in parameters {
        for x in t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()? {
            h.update(x.to_le_bytes());
        }
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// The flow's parameters as `storage` keeps them, by name.
fn stored_parameters(flow: &NormalizingFlow, storage: FlowStorage) -> Result<Vec<(String, candle_core::Tensor)>> {
    flow.named_parameters().into_iter().map(|(n, v)| Ok((n, v.as_tensor().to_dtype(storage.dtype())?))).collect()
}

/// The manifest with the checksum of the parameters as stored, the permutations and the format
/// version its storage needs filled in, and the local density's checksum when there is one.
fn describe(
    mut manifest: Manifest,
    stored: &[(String, candle_core::Tensor)],
    flow: &NormalizingFlow,
    local: Option<&LocalDensity>,
) -> Result<Manifest> {
    manifest.parameters_sha256 = parameters_sha256(stored.iter().map(|(_, t)| t))?;
    if manifest.flow_storage == FlowStorage::F16 {
        manifest.format_version = manifest.format_version.max(FORMAT_VERSION_F16);
    }
    manifest.permutations = flow.blocks.iter().map(|b| b.perm.clone()).collect();
    match (local, &mut manifest.local_density) {
        (Some(g), Some(info)) => *info = LocalDensityInfo::of(g, info.vectors, info.images),
        (None, None) => {}
        _ => return Err(Error::Config("a local density and its manifest entry go together".into())),
    }
    Ok(manifest)
}

/// Writes `flow` (in `manifest.flow_storage`'s type) and the local density, if any, with
/// `manifest` (checksums and permutations filled in) to `path` atomically: an existing file is
/// replaced whole or not at all. Returns the manifest as written.
pub fn write(path: &Path, manifest: Manifest, flow: &NormalizingFlow, local: Option<&LocalDensity>) -> Result<Manifest> {
    let mut data = stored_parameters(flow, manifest.flow_storage)?;
    let manifest = describe(manifest, &data, flow, local)?;
    if let Some(g) = local {
        data.extend(g.tensors()?);
    }
    let mut meta = HashMap::new();
    meta.insert(MANIFEST_KEY.to_string(), serde_json::to_string(&manifest).expect("manifest serializes"));
    let buf = safetensors::serialize(data.iter().map(|(n, t)| (n.as_str(), t)), Some(meta))
        .map_err(|e| Error::Model { path: path.to_path_buf(), reason: e.to_string() })?;
    write_atomic(path, &buf)?;
    Ok(manifest)
}

impl Model {
    /// A model of `flow`, rounded to `manifest.flow_storage`'s precision.
    pub fn new(manifest: Manifest, flow: NormalizingFlow) -> Result<Self> {
        manifest.flow_storage.round(&flow)?;
        let stored = stored_parameters(&flow, manifest.flow_storage)?;
        Ok(Model { manifest: describe(manifest, &stored, &flow, None)?, flow, local: None })
    }

    /// Stores the flow as `storage` from now on: rounds it (f16) and updates the manifest's
    /// storage and checksum. Going back to f32 keeps the rounded values.
    pub fn set_flow_storage(&mut self, storage: FlowStorage) -> Result<()> {
        storage.round(&self.flow)?;
        self.manifest.flow_storage = storage;
        let stored = stored_parameters(&self.flow, storage)?;
        self.manifest = describe(self.manifest.clone(), &stored, &self.flow, self.local.as_ref())?;
        Ok(())
    }

    /// Writes the model atomically (see [`write`]).
    pub fn save(&self, path: &Path) -> Result<()> {
        write(path, self.manifest.clone(), &self.flow, self.local.as_ref()).map(|_| ())
    }

    /// Reads only the manifest (cheap).
    pub fn read_manifest(path: &Path) -> Result<Manifest> {
        let bad = |reason: String| Error::Model { path: path.to_path_buf(), reason };
        let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        use std::io::Read;
        let mut len = [0u8; 8];
        f.read_exact(&mut len).map_err(|_| bad("file too short to be a model".into()))?;
        let n = header_length(u64::from_le_bytes(len), u64::MAX, path)?;
        let mut header = vec![0u8; n];
        f.read_exact(&mut header).map_err(|_| bad("truncated header".into()))?;
        manifest_from_header(&header, path)
    }

    /// Loads and verifies a model: format version, parameter shapes and checksum.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_bytes(&bytes, path, device)
    }

    /// [`Model::load`] from the bytes of a model file (`path` names it in errors). Sizes claimed
    /// by the manifest are checked against the file before anything is allocated.
    pub fn from_bytes(bytes: &[u8], path: &Path, device: &Device) -> Result<Self> {
        let bad = |reason: String| Error::Model { path: path.to_path_buf(), reason };
        if bytes.len() < 8 {
            return Err(bad("file too short to be a model".into()));
        }
        let n = header_length(u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")), bytes.len() as u64 - 8, path)?;
        let manifest = manifest_from_header(&bytes[8..8 + n], path)?;
        manifest.flow.validate().map_err(|e| bad(format!("manifest: {e}")))?;
        let claimed = manifest.flow.parameter_count();
        if claimed.saturating_mul(manifest.flow_storage.bytes_per_parameter()) > bytes.len() {
            return Err(bad(format!("the manifest describes {claimed} parameters, more than the file holds")));
        }
        let tensors = candle_core::safetensors::load_buffer(bytes, device).map_err(|e| bad(format!("parameters: {e}")))?;
        let flow = NormalizingFlow::from_parameters(manifest.flow.clone(), &tensors, path, device)?;
        for (k, b) in flow.blocks.iter().enumerate() {
            if manifest.permutations.get(k) != Some(&b.perm) {
                return Err(bad(format!("permutation of block {k} differs from this build's")));
            }
        }
        let sha = parameters_sha256(flow.named_parameters().iter().map(|(_, v)| v.as_tensor()))?;
        if sha != manifest.parameters_sha256 {
            return Err(bad("parameter checksum mismatch: the file is corrupted or was edited".into()));
        }
        let local = match &manifest.local_density {
            Some(info) => {
                let g = LocalDensity::from_tensors(&tensors, info, path)?;
                if g.sha256() != info.sha256 {
                    return Err(bad("local density checksum mismatch: the file is corrupted or was edited".into()));
                }
                Some(g)
            }
            None => None,
        };
        Ok(Model { manifest, flow, local })
    }

    /// Refuses a backbone whose kind or weights differ from the ones the model was trained with.
    pub fn check_backbone(&self, kind: BackboneKind, weights_sha256: &str, path: &Path) -> Result<()> {
        if kind != self.manifest.backbone || weights_sha256 != self.manifest.backbone_weights_sha256 {
            return Err(Error::Model {
                path: path.to_path_buf(),
                reason: format!(
                    "trained with {} weights {}, but the available {} weights are {}",
                    self.manifest.backbone.id(),
                    &self.manifest.backbone_weights_sha256[..12],
                    kind.id(),
                    &weights_sha256[..12.min(weights_sha256.len())]
                ),
            });
        }
        Ok(())
    }
}
