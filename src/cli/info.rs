//! `differnet info`: a readable summary of a model file; `--json` prints the whole manifest.

use super::{print_json, Cli};
use anyhow::{Context, Result};
use differnet::model::{Manifest, Model};
use std::path::Path;

/// The summary lines of a manifest (`bytes`: the file's size).
pub fn summary(m: &Manifest, bytes: u64) -> String {
    let t = &m.train;
    let f = &m.flow;
    let a = &t.augment;
    // per block: two subnets, each halves-in → 3 hidden layers → scale and shift of the other half
    let params = f.blocks * (3 * f.hidden * f.dim + 6 * f.hidden + 4 * f.hidden * f.hidden + 2 * f.dim);
    let jitter = if a.brightness + a.contrast + a.saturation > 0.0 {
        format!(", jitter brightness {} contrast {} saturation {}", a.brightness, a.contrast, a.saturation)
    } else {
        String::new()
    };
    let tiles = match t.tiles {
        0 => "tiles by aspect ratio".to_string(),
        1 => "whole image".to_string(),
        n => format!("{n} tiles"),
    };
    let threshold = match &m.threshold {
        Some(th) => format!("{:.6} ({})", th.value, th.method),
        None => "none (set one with `differnet calibrate`)".into(),
    };
    let kind = match &m.local_density {
        Some(d) => {
            let contrast = if d.image_contrast { "image contrast" } else { "vectors alone" };
            match d.coarse_radius {
                Some(r) if d.coarse_eroded => format!("feature maps ({contrast}, eroded coarse scale of {r} cells)"),
                Some(r) => format!("feature maps ({contrast}, coarse scale of {r} cells)"),
                None => format!("feature maps ({contrast}, fine scale only)"),
            }
        }
        None => "gradient maps".to_string(),
    };
    let heat_maps = match &m.localization {
        Some(r) => format!("{kind}, scaled against {} good images' {} maps ({} views)", r.images, r.map.id(), r.views),
        None => format!("{kind}, scaled per image"),
    };
    let image_score = match m.image_score {
        differnet::model::ImageScore::Flow => "image score: the flow's".to_string(),
        differnet::model::ImageScore::FlowAndMapMax(st) => {
            format!("image score: the flow's + the feature map's maximum, standardized on {} held-out images", st.images)
        }
    };
    let pose = m.training.pose_check.as_ref().map(|p| format!("; {}", p.verdict())).unwrap_or_default();
    let last_loss = m.training.epoch_losses.last().map(|l| format!(", last loss {l:.4}")).unwrap_or_default();
    [
        format!(
            "backbone      {} (weights sha256 {}…), stages {:?}, {} input normalization, {tiles}",
            m.backbone.id(),
            &m.backbone_weights_sha256[..12.min(m.backbone_weights_sha256.len())],
            t.feature_stages(),
            t.input_normalization.id()
        ),
        format!(
            "flow          {} coupling blocks, width {}, alpha {}, {} features in, ~{:.1} M parameters",
            f.blocks,
            f.hidden,
            f.alpha,
            f.dim,
            params as f64 / 1e6
        ),
        format!(
            "schedule      {} epochs, batch {} images x {} views ({}), rotation {}{jitter}, lr {:e}, Adam betas ({}, {}), seed {}{pose}",
            t.epochs,
            t.batch_images,
            t.views_per_image,
            if t.fresh_views { format!("new each epoch, {} extracted", t.cached_views) } else { format!("from {} cached", t.cached_views) },
            if a.rotate { "on" } else { "off" },
            t.adam.lr,
            t.adam.beta1,
            t.adam.beta2,
            t.seed
        ),
        format!("scoring       {:?}, {} test view(s), {image_score}; threshold {threshold}; heat maps {heat_maps}", m.score, m.test_views),
        format!(
            "training data {} images from {} (sha256 {}…); {:.0} s features, {:.0} s flow{last_loss}",
            m.training_data.n_images,
            m.training_data.root,
            &m.training_data.images_sha256[..12.min(m.training_data.images_sha256.len())],
            m.training.feature_seconds,
            m.training.flow_seconds
        ),
        format!(
            "file          {:.1} MB, differnet {}, format {} v{}, flow stored as {:?}, parameters sha256 {}…",
            bytes as f64 / 1e6,
            m.library_version,
            m.format,
            m.format_version,
            m.flow_storage,
            &m.parameters_sha256[..12.min(m.parameters_sha256.len())]
        ),
    ]
    .join("\n")
}

pub fn run(cli: &Cli, model: &Path) -> Result<()> {
    let m = Model::read_manifest(model)?;
    if cli.json {
        print_json(&m);
    } else {
        let bytes = std::fs::metadata(model).with_context(|| format!("{}", model.display()))?.len();
        println!("{}\n{}", model.display(), summary(&m, bytes));
    }
    Ok(())
}
