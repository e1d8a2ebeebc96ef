//! Features of image views: decode → resize to 448 → view (rotation/jitter) → normalize →
//! multi-scale backbone features, with an on-disk cache keyed by image content, backbone and view,
//! and the local feature vectors' Gaussian density ([`local_density`]) the feature maps read.

pub mod local_density;
pub mod pose;

use crate::backbone::weights::sha256_hex;
use crate::backbone::{self, multiscale_features, multiscale_features_and_local, Backbone, BackboneKind, INPUT_SIZE};
use crate::error::{write_atomic, Error, Result};
use crate::features::local_density::LocalGrid;
use crate::views::{
    auto_tiles, image_size, resize_bilinear, square_tiles, to_normalized_chw, to_normalized_chw_into, InputNormalization, Rgb8, View,
};
use candle_core::{Device, Tensor};
use std::path::{Path, PathBuf};

/// A frozen backbone, what identifies its weights, and which of its stages are pooled.
pub struct Extractor {
    pub backbone: Box<dyn Backbone>,
    pub weights_sha256: String,
    /// Stages whose maps make the features (see [`BackboneKind::default_stages`]).
    stages: Vec<usize>,
    pub device: Device,
    /// Views per forward pass.
    pub batch: usize,
    normalization: InputNormalization,
    lut: [[f32; 256]; 3],
    /// Square tiles along the long side of each image (1: the whole image, squashed to a square;
    /// 0: per image, see [`auto_tiles`]).
    tiles: usize,
}

impl Extractor {
    pub fn load(kind: BackboneKind, weights: &Path, device: &Device) -> Result<Self> {
        let weights_sha256 = crate::backbone::weights::sha256_file(weights)?;
        Ok(Self::from_backbone(backbone::load(kind, weights, device)?, weights_sha256, device))
    }

    /// Wraps a backbone built in memory (weights identified by `weights_sha256`), pooling its
    /// default stages.
    pub fn from_backbone(backbone: Box<dyn Backbone>, weights_sha256: String, device: &Device) -> Self {
        let stages = backbone.kind().default_stages();
        let normalization = backbone.kind().input_normalization();
        Extractor { backbone, weights_sha256, stages, device: device.clone(), batch: 4, normalization, lut: normalization.lut(), tiles: 1 }
    }

    /// Normalizes the input with `n` instead of the backbone's default.
    pub fn with_normalization(mut self, n: InputNormalization) -> Self {
        self.normalization = n;
        self.lut = n.lut();
        self
    }

    pub fn normalization(&self) -> InputNormalization {
        self.normalization
    }

    /// Cuts every image into `n` square tiles along its long side (see [`square_tiles`]; 0: as
    /// many as [`auto_tiles`] gives each image); each tile gets all views, and an image's score is
    /// the largest of its tiles'.
    pub fn with_tiles(mut self, n: usize) -> Self {
        self.tiles = n;
        self
    }

    pub fn tiles(&self) -> usize {
        self.tiles
    }

    /// Tiles of an image of this size.
    pub fn tiles_for(&self, width: usize, height: usize) -> usize {
        if self.tiles == 0 {
            auto_tiles(width, height)
        } else {
            self.tiles
        }
    }

    /// Features of `views` of each tile of a decoded image: [tiles × views, dim] row-major,
    /// tile by tile.
    pub fn image_features(&self, img: &Rgb8, views: &[View]) -> Result<Vec<f32>> {
        let tiles = self.tiles_for(img.width, img.height);
        let mut out = Vec::with_capacity(tiles * views.len() * self.feature_dim());
        for tile in square_tiles(img, tiles) {
            out.extend(self.view_features(&resize_bilinear(&tile, INPUT_SIZE, INPUT_SIZE), views)?);
        }
        Ok(out)
    }

    /// Pools `stages` instead (checked against the backbone).
    pub fn with_stages(mut self, stages: &[usize]) -> Result<Self> {
        self.kind().check_stages(stages)?;
        self.stages = stages.to_vec();
        Ok(self)
    }

    pub fn kind(&self) -> BackboneKind {
        self.backbone.kind()
    }

    pub fn stages(&self) -> &[usize] {
        &self.stages
    }

    /// Length of one view's feature vector.
    pub fn feature_dim(&self) -> usize {
        self.kind().feature_dim(&self.stages)
    }

    /// Multi-scale features of a batch of network inputs [N, 3, 448, 448] -> [N, dim].
    pub fn features(&self, x: &Tensor) -> Result<Tensor> {
        multiscale_features(self.backbone.as_ref(), &self.stages, x)
    }

    /// The network input of one view, [1, 3, 448, 448].
    pub fn input_tensor(&self, resized: &Rgb8, view: &View) -> Result<Tensor> {
        let v = view.apply(resized);
        Ok(Tensor::from_vec(to_normalized_chw(&v, &self.lut), (1, 3, INPUT_SIZE, INPUT_SIZE), &self.device)?)
    }

    /// Multi-scale features of each view of an image resized to 448×448: [views, dim] row-major.
    pub fn view_features(&self, resized: &Rgb8, views: &[View]) -> Result<Vec<f32>> {
        Ok(self.run_views(resized, views, false)?.0)
    }

    /// [`Self::view_features`] and, from the same forward passes, each view's grid of local
    /// vectors (the first scale's stage maps, not rotated back).
    pub fn view_features_and_local(&self, resized: &Rgb8, views: &[View]) -> Result<(Vec<f32>, Vec<LocalGrid>)> {
        self.run_views(resized, views, true)
    }

    /// The first scale's local vectors of each view (stage maps of the 448 input only, for
    /// fitting the local density), a grid per view.
    pub fn local_vectors(&self, resized: &Rgb8, views: &[View]) -> Result<Vec<LocalGrid>> {
        let mut out = vec![];
        for chunk in views.chunks(self.batch.max(1)) {
            let x = self.batch_input(resized, chunk)?;
            out.extend(local_grids(&backbone::local_vectors(&self.backbone.stage_maps(&x, &self.stages)?)?)?);
        }
        Ok(out)
    }

    /// Channels of a local vector: the stages' channels together.
    pub fn local_dim(&self) -> usize {
        self.stages.iter().map(|&s| self.kind().stage_channels()[s]).sum()
    }

    /// The network inputs of `views` of a 448×448 image, [views, 3, 448, 448] row-major: the
    /// rows an exported graph's `input` takes.
    pub fn view_inputs(&self, resized: &Rgb8, views: &[View]) -> Result<Vec<f32>> {
        Ok(self.batch_input(resized, views)?.flatten_all()?.to_vec1::<f32>()?)
    }

    /// The network inputs of `views` of a 448×448 image, [views, 3, 448, 448].
    fn batch_input(&self, resized: &Rgb8, views: &[View]) -> Result<Tensor> {
        use rayon::prelude::*;
        if (resized.width, resized.height) != (INPUT_SIZE, INPUT_SIZE) {
            return Err(Error::Config(format!("views need a {INPUT_SIZE}x{INPUT_SIZE} image, got {}x{}", resized.width, resized.height)));
        }
        let per_view = 3 * INPUT_SIZE * INPUT_SIZE;
        // each view written straight into its part of the batch (no per-view tensors to join)
        let mut batch = vec![0f32; views.len() * per_view];
        batch.par_chunks_mut(per_view).zip(views).for_each(|(dst, v)| to_normalized_chw_into(&v.apply(resized), &self.lut, dst));
        Ok(Tensor::from_vec(batch, (views.len(), 3, INPUT_SIZE, INPUT_SIZE), &self.device)?)
    }

    fn run_views(&self, resized: &Rgb8, views: &[View], local: bool) -> Result<(Vec<f32>, Vec<LocalGrid>)> {
        let mut out = Vec::with_capacity(views.len() * self.feature_dim());
        let mut grids = vec![];
        for chunk in views.chunks(self.batch.max(1)) {
            let (f, g) = self.input_features(&self.batch_input(resized, chunk)?, local)?;
            out.extend(f);
            grids.extend(g);
        }
        Ok((out, grids))
    }

    /// Pooled features of network inputs [N, 3, 448, 448] ([N, dim] row-major) and, with
    /// `local`, each input's grid of local vectors.
    pub fn input_features(&self, x: &Tensor, local: bool) -> Result<(Vec<f32>, Vec<LocalGrid>)> {
        let (y, l) = multiscale_features_and_local(self.backbone.as_ref(), &self.stages, x, local)?;
        let grids = match l {
            Some(l) => local_grids(&l)?,
            None => vec![],
        };
        Ok((y.flatten_all()?.to_vec1::<f32>()?, grids))
    }
}

/// The backbone's local vectors of a batch, a grid per input.
fn local_grids(l: &backbone::LocalVectors) -> Result<Vec<LocalGrid>> {
    let v = l.vectors.flatten_all()?.to_vec1::<f32>()?;
    let per_input = v.len() / l.vectors.dims()[0].max(1);
    Ok(v.chunks_exact(per_input.max(1)).map(|c| LocalGrid { width: l.width, height: l.height, vectors: c.to_vec() }).collect())
}

/// On-disk feature cache; `None` folder disables it.
#[derive(Clone, Debug)]
pub struct FeatureCache {
    pub dir: Option<PathBuf>,
}

/// Cache entry layout: magic, views (u32 LE), dim (u32 LE), the sha256 of those 16 bytes and
/// the payload, then views × dim f32 LE. Entries of the checksum-less `DNFEAT01` layout are
/// recomputed.
const MAGIC: &[u8; 8] = b"DNFEAT02";
const HEADER: usize = 16 + 32;

/// What a cache file holds.
#[derive(Debug, PartialEq)]
enum Entry {
    Valid(Vec<f32>),
    /// No file, or one written by an older layout: recompute quietly.
    Stale,
    /// A file of this layout that does not check out: report, delete, recompute.
    Corrupt(String),
}

fn entry_checksum(header: &[u8], payload: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(&header[..16]);
    h.update(payload);
    h.finalize().into()
}

/// The bytes of a cache entry holding `feats` ([views, dim] row-major).
fn encode_entry(feats: &[f32], dim: usize) -> Vec<u8> {
    let payload: Vec<u8> = feats.iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut buf = Vec::with_capacity(HEADER + payload.len());
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(&((feats.len() / dim) as u32).to_le_bytes());
    buf.extend_from_slice(&(dim as u32).to_le_bytes());
    let sum = entry_checksum(&buf, &payload);
    buf.extend_from_slice(&sum);
    buf.extend_from_slice(&payload);
    buf
}

/// Reads a cache entry expected to hold `n_views` × `dim` features.
fn decode_entry(bytes: &[u8], n_views: usize, dim: usize) -> Entry {
    if bytes.len() < 8 || &bytes[..8] != MAGIC {
        return Entry::Stale;
    }
    if bytes.len() < HEADER {
        return Entry::Corrupt(format!("{} bytes, shorter than its header", bytes.len()));
    }
    let field = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize;
    let (v, d) = (field(8), field(12));
    if (v, d) != (n_views, dim) {
        return Entry::Corrupt(format!("holds {v} views × {d} features where {n_views} × {dim} were asked for"));
    }
    let payload = &bytes[HEADER..];
    if payload.len() != n_views * dim * 4 {
        return Entry::Corrupt(format!("{} payload bytes where {} were expected", payload.len(), n_views * dim * 4));
    }
    if entry_checksum(bytes, payload)[..] != bytes[16..HEADER] {
        return Entry::Corrupt("checksum mismatch".into());
    }
    Entry::Valid(payload.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect())
}

impl FeatureCache {
    pub fn default_dir() -> PathBuf {
        crate::backbone::weights::home().join("features")
    }

    /// The cache key: image bytes, backbone, its weights, the pooled stages, the exact views, the
    /// input normalization and the tiles (named only when not ImageNet's and not 1, so older keys
    /// stay valid).
    pub fn key(image_bytes: &[u8], ex: &Extractor, views: &[View]) -> String {
        let spec = serde_json::to_string(views).expect("views serialize");
        let image = sha256_hex(image_bytes);
        let mut suffix = match ex.normalization {
            InputNormalization::Imagenet => String::new(),
            other => format!("|{}", other.id()),
        };
        // the tiles this image is cut into: an image that stays whole has the key it had before tiles
        let tiles = if ex.tiles == 0 { image_size(image_bytes).map_or(0, |(w, h)| auto_tiles(w, h)) } else { ex.tiles };
        if tiles != 1 {
            suffix += &format!("|tiles={tiles}");
        }
        sha256_hex(format!("{image}|{}|{}|{:?}|{spec}{suffix}", ex.kind().id(), ex.weights_sha256, ex.stages).as_bytes())
    }

    fn file(&self, key: &str) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| d.join(&key[..2]).join(format!("{key}.f32")))
    }

    /// The entry at `path` when it is valid; a corrupt one is reported and deleted.
    fn read(path: &Path, n_views: usize, dim: usize) -> Option<Vec<f32>> {
        let bytes = std::fs::read(path).ok()?;
        match decode_entry(&bytes, n_views, dim) {
            Entry::Valid(v) => Some(v),
            Entry::Stale => None,
            Entry::Corrupt(reason) => {
                tracing::warn!(path = %path.display(), %reason, "corrupt feature cache entry: deleted, recomputing");
                // another process may have replaced or removed it meanwhile: either way it is gone
                let _ = std::fs::remove_file(path);
                None
            }
        }
    }

    /// Features of `views` of each tile of the image at `path`: from the cache when present, else
    /// computed (and stored atomically). Returns [tiles × views, dim] row-major.
    pub fn features(&self, ex: &Extractor, path: &Path, views: &[View]) -> Result<Vec<f32>> {
        let dim = ex.feature_dim();
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let file = self.file(&Self::key(&bytes, ex, views));
        if let (Some(f), Some((w, h))) = (&file, image_size(&bytes)) {
            if let Some(v) = Self::read(f, ex.tiles_for(w, h) * views.len(), dim) {
                return Ok(v);
            }
        }
        let img = crate::views::decode_rgb(&bytes).map_err(|reason| Error::Image { path: path.to_path_buf(), reason })?;
        let feats = ex.image_features(&img, views)?;
        if feats.iter().any(|v| !v.is_finite()) {
            return Err(Error::Image { path: path.to_path_buf(), reason: "backbone produced non-finite features".into() });
        }
        if let Some(f) = file {
            // the cache only saves time: a failed write (e.g. a full disk) is reported, not fatal
            if let Err(e) = write_atomic(&f, &encode_entry(&feats, dim)) {
                static WARNED: std::sync::Once = std::sync::Once::new();
                WARNED.call_once(|| tracing::warn!("feature cache not written ({e}); going on without it"));
            }
        }
        Ok(feats)
    }
}

#[cfg(test)]
mod cache_entry_tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_every_flipped_bit_is_caught() {
        let feats: Vec<f32> = (0..6).map(|i| i as f32 * 0.25 - 1.0).collect();
        let good = encode_entry(&feats, 3);
        assert_eq!(decode_entry(&good, 2, 3), Entry::Valid(feats.clone()));
        for bit in 0..good.len() * 8 {
            let mut bad = good.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            let e = decode_entry(&bad, 2, 3);
            // a flip in the magic makes it a foreign file (recomputed), anywhere else corrupt
            assert!(if bit < 64 { e == Entry::Stale } else { matches!(e, Entry::Corrupt(_)) }, "bit {bit}: {e:?}");
        }
    }

    #[test]
    fn short_mismatched_and_old_entries_are_not_used() {
        let good = encode_entry(&[1.0, 2.0, 3.0, 4.0], 2);
        assert!(matches!(decode_entry(&good[..good.len() - 4], 2, 2), Entry::Corrupt(r) if r.contains("payload")));
        assert!(matches!(decode_entry(&good[..20], 2, 2), Entry::Corrupt(r) if r.contains("header")));
        assert!(matches!(decode_entry(&good, 1, 4), Entry::Corrupt(r) if r.contains("2 views × 2")));
        let mut old = b"DNFEAT01".to_vec();
        old.extend_from_slice(&good[8..]);
        assert_eq!(decode_entry(&old, 2, 2), Entry::Stale);
        assert_eq!(decode_entry(&[], 2, 2), Entry::Stale);
    }
}
