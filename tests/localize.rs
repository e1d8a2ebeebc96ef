//! Localization end to end: a model trained on synthetic good textures puts the maximum of its
//! gradient map (eq. 7) inside a defect painted into a new texture.

mod common;
use candle_core::Device;
use common::*;
use differnet::backbone::{BackboneKind, INPUT_SIZE};
use differnet::features::{Extractor, FeatureCache};
use differnet::flow::train::{train_flow, training_features, TrainConfig};
use differnet::flow::FlowConfig;
use differnet::localize::gradient_map;
use differnet::views::{load_rgb, resize_bilinear, test_views};

#[test]
fn heat_map_maximum_lies_in_the_painted_defect() {
    let ex =
        Extractor::load(BackboneKind::EfficientnetLite0, &shared().join("fixtures/efficientnet_lite0.safetensors"), &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("d");
    differnet::data::synth::generate(&root, 12, 0, 2, 21).unwrap();
    let ds = differnet::data::Dataset::open(&root).unwrap();
    let mut cfg = TrainConfig::new(BackboneKind::EfficientnetLite0);
    cfg.flow = FlowConfig { hidden: 256, ..cfg.flow };
    cfg.cached_views = 4;
    cfg.views_per_image = 4;
    cfg.batch_images = 4;
    cfg.epochs = 30;
    let cache = FeatureCache { dir: None };
    let feats = training_features(&ds.train, &cfg, &ex, &cache, &differnet::progress::Silent).unwrap();
    let (flow, _) = train_flow(&feats, &cfg, &Device::Cpu, &differnet::progress::Silent).unwrap();
    for sample in ds.test.iter().filter(|s| s.defect == "spot") {
        let img = load_rgb(&sample.path).unwrap();
        let map = gradient_map(&ex, &flow, &resize_bilinear(&img, INPUT_SIZE, INPUT_SIZE), &test_views(4)).unwrap();
        let mask = load_rgb(sample.mask.as_ref().unwrap()).unwrap();
        let mask448 = resize_bilinear(&mask, INPUT_SIZE, INPUT_SIZE).channel(0);
        let argmax = (0..map.len()).max_by(|&a, &b| map[a].total_cmp(&map[b])).unwrap();
        let (y, x) = (argmax / INPUT_SIZE, argmax % INPUT_SIZE);
        // inside the painted spot, allowing the blur's reach (3σ = 9 px) around it
        let near = (y.saturating_sub(9)..(y + 10).min(INPUT_SIZE))
            .any(|yy| (x.saturating_sub(9)..(x + 10).min(INPUT_SIZE)).any(|xx| mask448[yy * INPUT_SIZE + xx] > 127));
        assert!(near, "{}: heat-map maximum at ({x}, {y}) is not in the defect", sample.path.display());
    }
}
