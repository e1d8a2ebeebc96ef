//! Tall images through `pipeline::train` and `Detector` with `tiles: 0` (by aspect ratio): each
//! tile is a training image, an image's score is the largest of its tiles' scores.

mod common;
use common::*;
use differnet::backbone::BackboneKind;
use differnet::flow::train::{Schedule, TrainConfig};
use differnet::pipeline::{Detector, OpenOptions, TrainOptions};
use differnet::progress::Silent;
use differnet::views::{resize_bilinear, square_tiles, test_views};

fn tall_png(path: &std::path::Path, seed: u8) {
    let img =
        image::RgbImage::from_fn(40, 100, |x, y| image::Rgb([(x * 5) as u8 ^ seed, (y * 3) as u8, ((x + y) as u8).wrapping_mul(seed | 1)]));
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    img.save(path).unwrap();
}

#[test]
fn tall_images_are_scored_tile_by_tile() {
    let home = home_with_efficientnet();
    std::env::set_var("DIFFERNET_HOME", home.path());
    let data = home.path().join("tall");
    for i in 0..4 {
        tall_png(&data.join(format!("train/good/{i}.png")), 10 + i);
    }
    tall_png(&data.join("test/good/a.png"), 40);
    tall_png(&data.join("test/bad/b.png"), 77);
    let mut config = TrainConfig::with_schedule(BackboneKind::EfficientnetLite0, Schedule::Fast);
    (config.epochs, config.flow.hidden, config.batch_images, config.tiles) = (2, 32, 4, 0);
    let open = OpenOptions { cache: differnet::features::FeatureCache { dir: Some(home.path().join("cache")) }, ..OpenOptions::default() };
    let out = home.path().join("tall.safetensors");
    let opts =
        TrainOptions { holdout: None, feature_maps: false, open: open.clone(), ..TrainOptions::new(data.clone(), out.clone(), config) };
    let model = differnet::pipeline::train(&opts, &Silent, &Silent, &Silent).unwrap();
    assert_eq!(model.manifest.train.tiles, 0);
    let d = Detector::open(&out, &open).unwrap();
    assert_eq!(d.extractor.tiles_for(40, 100), 3);
    // the image's score is the largest of its three tiles' scores, each tile on its own
    let path = data.join("test/bad/b.png");
    let img = Detector::read_image(&path).unwrap();
    let views = test_views(1);
    let whole = d.score_image(&img, &views).unwrap();
    let per_tile: Vec<f64> = square_tiles(&img, 3)
        .iter()
        .map(|t| {
            let f = d.extractor.view_features(&resize_bilinear(t, 448, 448), &views).unwrap();
            differnet::score::anomaly_score(&d.model.flow, &f, d.model.flow.config.dim, d.model.manifest.score, 1, &d.extractor.device)
                .unwrap()
        })
        .collect();
    assert_eq!(whole, per_tile.iter().copied().fold(f64::NEG_INFINITY, f64::max));
    assert!(per_tile.iter().any(|s| *s != whole), "the tiles differ: {per_tile:?}");
    // cached scoring of the file gives the same score
    assert_eq!(d.score_paths(std::slice::from_ref(&path), &views, &Silent).unwrap(), vec![whole]);
    assert_eq!(d.score_paths(&[path], &views, &Silent).unwrap(), vec![whole]); // from the cache
    let ev = d.evaluate(&differnet::data::Dataset::open(&data).unwrap(), None, &Silent).unwrap();
    assert_eq!((ev.n_good, ev.n_defect), (1, 1));
}
