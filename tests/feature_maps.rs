//! `train`'s held-out calibration and the feature maps: the held-out split is deterministic and
//! kept out of the fit, the stored threshold meets the target false-positive rate on it,
//! `pred_score` is 0.5 at the threshold, the combined image score is standardized on the held-out
//! images, and the feature map of a painted defect peaks inside it.

mod common;
use common::*;
use differnet::backbone::BackboneKind;
use differnet::data::Dataset;
use differnet::flow::train::{Schedule, TrainConfig};
use differnet::localize::MapKind;
use differnet::model::ImageScore;
use differnet::pipeline::{Detector, OpenOptions, TrainOptions};
use differnet::progress::Silent;
use rand::SeedableRng;

fn options(data: &std::path::Path, out: &std::path::Path, cache: &std::path::Path, seed: u64) -> TrainOptions {
    let mut config = TrainConfig::with_schedule(BackboneKind::EfficientnetLite0, Schedule::Fast);
    (config.epochs, config.flow.hidden, config.batch_images, config.seed) = (2, 32, 4, seed);
    let open = OpenOptions { cache: differnet::features::FeatureCache { dir: Some(cache.to_path_buf()) }, ..OpenOptions::default() };
    TrainOptions { open, ..TrainOptions::new(data.to_path_buf(), out.to_path_buf(), config) }
}

// one test: the process-wide DIFFERNET_HOME is set once
#[test]
fn held_out_calibration_and_feature_maps() {
    let home = home_with_efficientnet();
    std::env::set_var("DIFFERNET_HOME", home.path());
    held_out_images_set_the_threshold_and_feature_maps_find_a_painted_defect(home.path());
    few_images_are_all_fitted_and_no_threshold_is_stored(home.path());
}

fn held_out_images_set_the_threshold_and_feature_maps_find_a_painted_defect(home: &std::path::Path) {
    let data = home.join("data");
    differnet::data::synth::generate(&data, 12, 2, 1, 5).unwrap();
    let out = home.join("m.safetensors");
    let opts = options(&data, &out, &home.join("cache"), 0);
    let model = differnet::pipeline::train(&opts, &Silent, &Silent, &Silent).unwrap();
    let m = &model.manifest;

    // 15% of 12 is fewer than 3, so 3 are held out; the fit is the other 9, and only them
    let all = Dataset::open(&data).unwrap().train;
    let split = differnet::data::validation::holdout_split(&all, 3.0 / 12.0, 0).unwrap();
    assert_eq!((split.fit.len(), split.held_out.len()), (9, 3));
    assert!(split.held_out.iter().all(|p| !split.fit.contains(p)));
    assert_eq!(m.training_data.n_images, 9);
    let mut shas: Vec<String> = split.fit.iter().map(|p| differnet::backbone::weights::sha256_file(p).unwrap()).collect();
    shas.sort();
    assert_eq!(
        m.training_data.images_sha256,
        differnet::backbone::weights::sha256_hex(shas.join("").as_bytes()),
        "the flow saw other images"
    );

    // the threshold flags no more than 1% of the held-out scores (here: none of 3)
    let t = m.threshold.as_ref().expect("a threshold from the held-out images");
    assert!(t.method.contains("3 held-out good images"), "{}", t.method);
    let d = Detector::open(&out, &opts.open).unwrap();
    let held = d.score_paths(&split.held_out, &d.views(None), &Silent).unwrap();
    assert!(held.iter().all(|s| *s < t.value), "held-out scores {held:?} reach the threshold {}", t.value);
    // the image score sums the flow's score and the map's maximum, each standardized on the same
    // held-out images: their combined scores average to 0
    match m.image_score {
        ImageScore::FlowAndMapMax(st) => assert_eq!(st.images, 3),
        other => panic!("expected the combined image score, got {other:?}"),
    }
    let mean = held.iter().sum::<f64>() / 3.0;
    assert!(mean.abs() < 1e-9, "held-out combined scores {held:?} do not average to 0");
    let ev = d.evaluate(&Dataset::open(&data).unwrap(), None, &Silent).unwrap();
    assert!(ev.flow_score_auroc.is_some(), "test reports the flow's score alone next to the combined one");
    let range = m.score_range.expect("the held-out score range");
    assert_eq!((range.min, range.max), (held.iter().cloned().fold(f64::MAX, f64::min), held.iter().cloned().fold(f64::MIN, f64::max)));
    // pred_score: 0.5 at the threshold, clamped to [0, 1] far away, increasing in between
    assert_eq!(d.decide(t.value).pred_score, Some(0.5));
    assert_eq!(d.decide(t.value + 1e9).pred_score, Some(1.0));
    assert_eq!(d.decide(t.value - 1e9).pred_score, Some(0.0));
    let near = (range.max - range.min) / 4.0;
    assert!(d.decide(t.value - near).pred_score < d.decide(t.value + near).pred_score);
    // the good-map range is of feature maps, and feature maps are the model's default
    assert_eq!(m.localization.as_ref().map(|r| (r.map, r.images)), Some((MapKind::Features, 3)));
    assert_eq!(d.default_map(), MapKind::Features);

    // a spot painted into a good test image: the feature map peaks inside it (or within the blur's reach)
    let good = Detector::read_image(&data.join("test/good/000.png")).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let (bad, mask) = differnet::data::validation::paste_defect(&good, "spot", &mut rng);
    let views = d.views(None);
    let (score_bad, map) = d.inspect(&bad, &views, Some(MapKind::Features)).unwrap();
    let map = map.unwrap();
    assert_eq!((map.width, map.height), (bad.width, bad.height));
    assert_eq!(score_bad, d.score_image(&bad, &views).unwrap(), "the map's pass gives the same score");
    let peak = map.values.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
    let (px, py) = ((peak % map.width) as f64, (peak / map.width) as f64);
    let inside: Vec<usize> = (0..mask.len()).filter(|&i| mask[i] > 0).collect();
    let (cx, cy) = (
        inside.iter().map(|&i| (i % map.width) as f64).sum::<f64>() / inside.len() as f64,
        inside.iter().map(|&i| (i / map.width) as f64).sum::<f64>() / inside.len() as f64,
    );
    let radius = (inside.len() as f64 / std::f64::consts::PI).sqrt();
    let reach = radius + 16.0 * map.width as f64 / 448.0; // one stride-16 cell of the 448 input
    assert!(
        ((px - cx).powi(2) + (py - cy).powi(2)).sqrt() <= reach,
        "peak ({px}, {py}) is away from the spot at ({cx:.0}, {cy:.0}) r {radius:.0}"
    );
    let good_map = d.anomaly_map(&good, &views, MapKind::Features).unwrap();
    let max = |v: &[f32]| v.iter().cloned().fold(f32::MIN, f32::max);
    assert!(max(&map.values) > max(&good_map.values), "the defect raises the map's maximum");

    // the same seed gives the same model, local density included
    let again = home.join("again.safetensors");
    let opts2 = TrainOptions { out: again.clone(), ..opts.clone() };
    let model2 = differnet::pipeline::train(&opts2, &Silent, &Silent, &Silent).unwrap();
    assert_eq!(model2.manifest.parameters_sha256, m.parameters_sha256);
    assert_eq!(model2.manifest.local_density, m.local_density);
    assert_eq!(model2.manifest.threshold, m.threshold);

    // with image contrast the density models twice the channels, and the file gives it back
    let contrast = home.join("contrast.safetensors");
    let opts3 = TrainOptions { out: contrast.clone(), image_contrast: !opts.image_contrast, ..opts.clone() };
    let model3 = differnet::pipeline::train(&opts3, &Silent, &Silent, &Silent).unwrap();
    let (info, plain) = (model3.manifest.local_density.clone().unwrap(), m.local_density.clone().unwrap());
    assert_eq!(info.image_contrast, opts3.image_contrast);
    assert_eq!(info.dim * if plain.image_contrast { 2 } else { 1 }, plain.dim * if info.image_contrast { 2 } else { 1 });
    let d3 = Detector::open(&contrast, &opts.open).unwrap();
    assert_eq!(d3.model.local, model3.local, "the local density read back differs");
    let map3 = d3.anomaly_map(&bad, &views, MapKind::Features).unwrap();
    assert_eq!((map3.width, map3.height), (bad.width, bad.height));
    assert_ne!(map3.values, map.values, "image contrast left the map unchanged");

    // the coarse scale is stored with its radius and read back; without it the map changes
    let radius = opts.coarse_radius.expect("a coarse scale by default");
    assert_eq!(plain.coarse_radius, Some(radius));
    assert!(plain.coarse_eroded, "a new model erodes its coarse scale");
    assert_eq!(m.local_density.as_ref().and_then(|i| i.coarse_radius), Some(radius));
    let fine_only = home.join("fine.safetensors");
    let opts4 = TrainOptions { out: fine_only.clone(), coarse_radius: None, ..opts.clone() };
    let model4 = differnet::pipeline::train(&opts4, &Silent, &Silent, &Silent).unwrap();
    assert_eq!(model4.manifest.local_density.as_ref().unwrap().coarse_radius, None);
    assert!(model4.local.as_ref().unwrap().coarse.is_none());
    let d4 = Detector::open(&fine_only, &opts.open).unwrap();
    assert_eq!(d4.model.local, model4.local, "the fine-only density read back differs");
    assert_eq!(
        d4.model.local.as_ref().unwrap().fine,
        d.model.local.as_ref().unwrap().fine,
        "the fine scale does not depend on the coarse one"
    );
    let map4 = d4.anomaly_map(&bad, &views, MapKind::Features).unwrap();
    assert!(map.values.iter().zip(&map4.values).any(|(a, b)| a != b), "the coarse scale left the map unchanged");
}

fn few_images_are_all_fitted_and_no_threshold_is_stored(home: &std::path::Path) {
    let data = home.join("few");
    differnet::data::synth::generate(&data, 6, 1, 1, 2).unwrap();
    let out = home.join("m.safetensors");
    let model = differnet::pipeline::train(&options(&data, &out, &home.join("cache"), 0), &Silent, &Silent, &Silent).unwrap();
    assert_eq!(model.manifest.training_data.n_images, 6);
    assert!(model.manifest.threshold.is_none() && model.manifest.score_range.is_none());
    assert_eq!(model.manifest.image_score, ImageScore::Flow, "nothing held out to standardize on");
    assert!(model.local.is_some(), "the local density is fitted on every image");
}
