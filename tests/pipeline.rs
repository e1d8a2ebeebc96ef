//! Training, model files, data loading and the feature cache, on small generated inputs.

mod common;
use candle_core::Device;
use common::*;
use differnet::backbone::BackboneKind;
use differnet::features::{Extractor, FeatureCache};
use differnet::flow::train::{train_flow, TrainConfig};
use differnet::flow::FlowConfig;
use differnet::model::{Manifest, Model, TrainingData, FORMAT, FORMAT_VERSION};
use differnet::score::ScoreKind;
use differnet::views::{load_rgb, View};
use rand::{Rng, SeedableRng};

fn tiny_config(seed: u64) -> TrainConfig {
    let mut cfg = TrainConfig::new(BackboneKind::Alexnet);
    cfg.flow = FlowConfig { dim: 12, blocks: 2, hidden: 16, alpha: 3.0 };
    cfg.epochs = 5;
    cfg.batch_images = 3;
    cfg.views_per_image = 2;
    cfg.cached_views = 4;
    cfg.seed = seed;
    cfg
}

fn random_features(n: usize, views: usize, dim: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| (0..views * dim).map(|_| rng.random_range(-1.0..1.0f32)).collect()).collect()
}

fn params(m: &differnet::flow::NormalizingFlow) -> Vec<f32> {
    m.named_parameters().iter().flat_map(|(_, v)| vec_f32(v.as_tensor())).collect()
}

#[test]
fn same_seed_same_model_and_loss_decreases() {
    let feats = random_features(7, 4, 12, 1);
    let (a, sa) = train_flow(&feats, &tiny_config(3), &Device::Cpu, &differnet::progress::Silent).unwrap();
    let (b, _) = train_flow(&feats, &tiny_config(3), &Device::Cpu, &differnet::progress::Silent).unwrap();
    let (c, _) = train_flow(&feats, &tiny_config(4), &Device::Cpu, &differnet::progress::Silent).unwrap();
    assert_eq!(params(&a), params(&b));
    assert_ne!(params(&a), params(&c));
    assert!(sa.epoch_losses.last().unwrap() < sa.epoch_losses.first().unwrap(), "{:?}", sa.epoch_losses);
}

#[test]
fn non_finite_loss_stops_training_with_an_error() {
    let mut feats = random_features(4, 4, 12, 2);
    feats[2][5] = f32::NAN;
    let err = train_flow(&feats, &tiny_config(0), &Device::Cpu, &differnet::progress::Silent).err().expect("must fail");
    assert!(matches!(err, differnet::Error::Training(_)), "{err}");
    assert!(err.to_string().contains("NaN"), "{err}");
}

fn tiny_model() -> Model {
    let cfg = tiny_config(0);
    let (flow, summary) = train_flow(&random_features(4, 4, 12, 5), &cfg, &Device::Cpu, &differnet::progress::Silent).unwrap();
    let manifest = Manifest {
        format: FORMAT.into(),
        format_version: FORMAT_VERSION,
        library_version: "test".into(),
        backbone: BackboneKind::Alexnet,
        backbone_weights_sha256: "ab".repeat(32),
        flow: cfg.flow.clone(),
        permutations: vec![],
        score: ScoreKind::MeanZ2,
        test_views: 4,
        train: cfg,
        threshold: None,
        image_score: Default::default(),
        score_range: None,
        local_density: None,
        localization: None,
        training_data: TrainingData { root: "x".into(), n_images: 4, images_sha256: "0".into() },
        training: summary,
        flow_storage: Default::default(),
        parameters_sha256: String::new(),
    };
    Model::new(manifest, flow).unwrap()
}

#[test]
fn model_round_trip_and_corruption_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    let m = tiny_model();
    m.save(&path).unwrap();
    let back = Model::load(&path, &Device::Cpu).unwrap();
    assert_eq!(params(&back.flow), params(&m.flow));
    assert_eq!(back.manifest.parameters_sha256, m.manifest.parameters_sha256);
    // a flipped byte in the parameter data
    let mut bytes = std::fs::read(&path).unwrap();
    let n = bytes.len();
    bytes[n - 10] ^= 0x40;
    let bad = dir.path().join("bad.safetensors");
    std::fs::write(&bad, &bytes).unwrap();
    let e = Model::load(&bad, &Device::Cpu).err().expect("corrupt file must be refused").to_string();
    assert!(e.contains("checksum") && e.contains("bad.safetensors"), "{e}");
    // truncated
    std::fs::write(&bad, &bytes[..n / 2]).unwrap();
    assert!(Model::load(&bad, &Device::Cpu).is_err());
    // not a model
    std::fs::write(&bad, b"hello").unwrap();
    let e = Model::load(&bad, &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("bad.safetensors"), "{e}");
    // a newer format version
    let mut newer = tiny_model();
    newer.manifest.format_version = 99;
    newer.save(&bad).unwrap();
    let e = Model::load(&bad, &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("format version 99"), "{e}");
    // a hand-edited manifest claiming a huge flow is refused before anything is allocated
    assert_eq!(m.manifest.flow.parameter_count(), m.flow.parameter_count());
    let n_header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let text = std::str::from_utf8(&bytes[8..8 + n_header]).unwrap();
    let hidden = format!("\\\"hidden\\\":{}", m.manifest.flow.hidden);
    assert!(text.contains(&hidden), "manifest JSON is embedded as an escaped string");
    let header = text.replacen(&hidden, "\\\"hidden\\\":1099511627776", 1);
    let mut edited = (header.len() as u64).to_le_bytes().to_vec();
    edited.extend(header.as_bytes());
    edited.extend(&bytes[8 + n_header..]);
    std::fs::write(&bad, &edited).unwrap();
    let e = Model::load(&bad, &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("more than the file holds"), "{e}");
    // a different backbone is refused
    let e = back.check_backbone(BackboneKind::EfficientnetLite0, &"cd".repeat(32), &path).err().unwrap().to_string();
    assert!(e.contains("trained with alexnet"), "{e}");
    // saving over an existing model replaces it whole and leaves no temp files
    m.save(&path).unwrap();
    let names: Vec<String> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
}

#[test]
fn an_f16_flow_halves_the_parameters_and_scores_within_1e_3() {
    use differnet::model::{FlowStorage, FORMAT_VERSION_F16};
    use differnet::score::view_scores;
    let dir = tempfile::tempdir().unwrap();
    let (p32, p16) = (dir.path().join("m32.safetensors"), dir.path().join("m16.safetensors"));
    let m = tiny_model();
    m.save(&p32).unwrap();
    let mut h = tiny_model();
    h.set_flow_storage(FlowStorage::F16).unwrap();
    h.save(&p16).unwrap();
    let (n32, n16) = (std::fs::metadata(&p32).unwrap().len() as i64, std::fs::metadata(&p16).unwrap().len() as i64);
    // two bytes fewer per parameter; the headers differ only in a few manifest fields
    let saved = n32 - n16 - 2 * m.flow.parameter_count() as i64;
    assert!(saved.abs() < 200, "f32 {n32} B, f16 {n16} B, {} parameters", m.flow.parameter_count());
    let back = Model::load(&p16, &Device::Cpu).unwrap();
    assert_eq!(back.manifest.flow_storage, FlowStorage::F16);
    assert_eq!(back.manifest.format_version, FORMAT_VERSION_F16);
    // the rounded flow in memory is the one the file gives back
    assert_eq!(params(&back.flow), params(&h.flow));
    assert_ne!(params(&back.flow), params(&m.flow));
    let feats: Vec<f32> = random_features(1, 16, 12, 9).remove(0);
    let score = |model: &Model| view_scores(&model.flow, &feats, 12, ScoreKind::MeanZ2, &Device::Cpu).unwrap();
    let (s32, s16) = (score(&m), score(&back));
    for (a, b) in s32.iter().zip(&s16) {
        assert!(((a - b) / a).abs() < 1e-3, "f32 {a} f16 {b}");
    }
    assert_eq!(s16, score(&h));
    // a flipped bit in an f16 parameter is caught by the checksum
    let mut bytes = std::fs::read(&p16).unwrap();
    let n = bytes.len();
    bytes[n - 7] ^= 0x08;
    std::fs::write(&p16, &bytes).unwrap();
    let e = Model::load(&p16, &Device::Cpu).err().expect("corrupt f16 file must be refused").to_string();
    assert!(e.contains("checksum"), "{e}");
}

#[test]
fn image_formats_decode_to_the_same_rgb() {
    let dir = tempfile::tempdir().unwrap();
    let (w, h) = (13u32, 7u32);
    let gray = image::GrayImage::from_fn(w, h, |x, y| image::Luma([(x * 19 + y * 7) as u8]));
    let rgb = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 19) as u8, (y * 30) as u8, 200]));
    let expect_gray: Vec<u8> = gray.pixels().flat_map(|p| [p[0]; 3]).collect();
    let expect_rgb: Vec<u8> = rgb.as_raw().clone();
    type Case<'a> = (&'a str, Box<dyn Fn(&std::path::Path) + 'a>, &'a Vec<u8>);
    let cases: Vec<Case> = vec![
        ("g.png", Box::new(|p| gray.save(p).unwrap()), &expect_gray),
        ("g.bmp", Box::new(|p| image::DynamicImage::ImageLuma8(gray.clone()).to_rgb8().save(p).unwrap()), &expect_gray),
        ("g.tif", Box::new(|p| gray.save(p).unwrap()), &expect_gray),
        ("c.png", Box::new(|p| rgb.save(p).unwrap()), &expect_rgb),
        ("c.tiff", Box::new(|p| rgb.save(p).unwrap()), &expect_rgb),
        ("a.png", Box::new(|p| image::DynamicImage::ImageRgb8(rgb.clone()).to_rgba8().save(p).unwrap()), &expect_rgb),
        ("g16.png", Box::new(|p| image::DynamicImage::ImageLuma8(gray.clone()).to_luma16().save(p).unwrap()), &expect_gray),
    ];
    for (name, write, want) in cases {
        let p = dir.path().join(name);
        write(&p);
        let img = load_rgb(&p).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!((img.width, img.height), (w as usize, h as usize), "{name}");
        assert_eq!(&img.data, want, "{name}");
    }
    // JPEG is lossy: close, not equal
    let p = dir.path().join("c.jpg");
    rgb.save(&p).unwrap();
    let img = load_rgb(&p).unwrap();
    let err = img.data.iter().zip(&expect_rgb).map(|(a, b)| (*a as i32 - *b as i32).abs()).max().unwrap();
    assert!(err < 40, "jpeg error {err}");
}

#[test]
fn bad_images_and_folders_give_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let png = {
        let mut v = std::io::Cursor::new(vec![]);
        image::GrayImage::new(20, 20).write_to(&mut v, image::ImageFormat::Png).unwrap();
        v.into_inner()
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty.png", vec![]),
        ("text.png", b"this is not an image".to_vec()),
        ("truncated.png", png[..png.len() / 2].to_vec()),
        ("bomb.png", {
            // a valid PNG header claiming 100000 x 100000 pixels
            let mut b = png.clone();
            b[16..20].copy_from_slice(&100_000u32.to_be_bytes());
            b[20..24].copy_from_slice(&100_000u32.to_be_bytes());
            b
        }),
    ];
    let mut flipped = png.clone();
    flipped[30] ^= 0x55; // inside IHDR: its CRC no longer matches
    let cases = cases.into_iter().chain([("bitflip.png", flipped)]);
    for (name, bytes) in cases {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        let e = load_rgb(&p).err().unwrap_or_else(|| panic!("{name} must be refused")).to_string();
        assert!(e.contains(name), "{e}");
    }
    // readable oddities decode: 1×1, palette PNG, CMYK JPEG; a damaged JPEG decodes or is refused, never panics
    let one = dir.path().join("one.png");
    image::RgbImage::from_pixel(1, 1, image::Rgb([9, 8, 7])).save(&one).unwrap();
    assert_eq!(load_rgb(&one).unwrap().data, vec![9, 8, 7]);
    let palette = dir.path().join("palette.png");
    {
        let f = std::fs::File::create(&palette).unwrap();
        let mut enc = png::Encoder::new(f, 2, 1);
        enc.set_color(png::ColorType::Indexed);
        enc.set_depth(png::BitDepth::Eight);
        enc.set_palette(vec![255, 0, 0, 0, 0, 255]);
        enc.write_header().unwrap().write_image_data(&[1, 0]).unwrap();
    }
    assert_eq!(load_rgb(&palette).unwrap().data, vec![0, 0, 255, 255, 0, 0]);
    let cmyk = dir.path().join("cmyk.jpg");
    {
        let mut buf = vec![];
        let enc = jpeg_encoder::Encoder::new(&mut buf, 100);
        enc.encode(&[0, 255, 255, 0, 0, 0, 0, 0], 2, 1, jpeg_encoder::ColorType::Cmyk).unwrap();
        std::fs::write(&cmyk, buf).unwrap();
    }
    match load_rgb(&cmyk) {
        Ok(img) => assert_eq!((img.width, img.height), (2, 1)),
        Err(e) => assert!(e.to_string().contains("cmyk.jpg"), "{e}"),
    }
    let jpg = dir.path().join("ok.jpg");
    image::RgbImage::from_fn(32, 32, |x, y| image::Rgb([x as u8 * 8, y as u8 * 8, 90])).save(&jpg).unwrap();
    let mut bytes = std::fs::read(&jpg).unwrap();
    for i in (bytes.len() / 3..bytes.len() - 2).step_by(17) {
        bytes[i] ^= 0x81;
    }
    let damaged = dir.path().join("damaged.jpg");
    std::fs::write(&damaged, bytes).unwrap();
    if let Err(e) = load_rgb(&damaged) {
        assert!(e.to_string().contains("damaged.jpg"), "{e}");
    }
    // a looping symlink named like an image in a folder of images
    let looped = dir.path().join("loop");
    std::fs::create_dir_all(&looped).unwrap();
    std::fs::copy(&one, looped.join("a.png")).unwrap();
    std::os::unix::fs::symlink(looped.join("b.png"), looped.join("c.png")).unwrap();
    std::os::unix::fs::symlink(looped.join("c.png"), looped.join("b.png")).unwrap();
    let e = differnet::data::expand_inputs(std::slice::from_ref(&looped)).expect_err("a looping link is reported").to_string();
    assert!((e.contains("b.png") || e.contains("c.png")) && e.contains("Too many levels"), "{e}");
    let e = load_rgb(&dir.path().join("missing.png")).err().unwrap().to_string();
    assert!(e.contains("missing.png"), "{e}");
    let empty = dir.path().join("empty_dataset");
    std::fs::create_dir_all(empty.join("train/good")).unwrap();
    let e = differnet::data::Dataset::open(&empty).err().unwrap().to_string();
    assert!(e.contains("empty_dataset"), "{e}");
}

#[test]
fn cached_features_equal_fresh_ones_and_invalidate() {
    let weights = shared().join("fixtures/efficientnet_lite0.safetensors");
    let ex = Extractor::load(BackboneKind::EfficientnetLite0, &weights, &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    differnet::data::synth::generate(&dir.path().join("d"), 1, 0, 0, 9).unwrap();
    let img = dir.path().join("d/train/good/000.png");
    let cache = FeatureCache { dir: Some(dir.path().join("cache")) };
    let nocache = FeatureCache { dir: None };
    let views = vec![View::rotation(0.0), View::rotation(37.0)];
    let fresh = nocache.features(&ex, &img, &views).unwrap();
    let first = cache.features(&ex, &img, &views).unwrap();
    let again = cache.features(&ex, &img, &views).unwrap();
    assert_eq!(fresh, first);
    assert_eq!(first, again);
    let count = || walk(&dir.path().join("cache"));
    assert_eq!(count(), 1);
    // other views, other image content: new entries
    cache.features(&ex, &img, &views[..1]).unwrap();
    assert_eq!(count(), 2);
    let rgb = load_rgb(&img).unwrap();
    let mut changed = image::RgbImage::from_raw(rgb.width as u32, rgb.height as u32, rgb.data).unwrap();
    changed.put_pixel(3, 3, image::Rgb([255, 0, 0]));
    changed.save(&img).unwrap();
    let after = cache.features(&ex, &img, &views).unwrap();
    assert_eq!(count(), 3);
    assert_ne!(after, first);
    // other pooled stages: a new entry with those stages' features (the last stage: 3·320)
    let last = Extractor::load(BackboneKind::EfficientnetLite0, &weights, &Device::Cpu).unwrap().with_stages(&[6]).unwrap();
    let last_stage = cache.features(&last, &img, &views).unwrap();
    assert_eq!(count(), 4);
    assert_eq!(last_stage.len(), 2 * 960);
    assert_eq!(last_stage, nocache.features(&last, &img, &views).unwrap());

    // a flipped bit in an entry is caught: the entry is recomputed and rewritten, never used
    let entry = std::fs::read_dir(dir.path().join("cache"))
        .unwrap()
        .flat_map(|d| std::fs::read_dir(d.unwrap().path()).unwrap())
        .map(|e| e.unwrap().path())
        .find(|p| std::fs::metadata(p).unwrap().len() as usize == 48 + 2 * 960 * 4)
        .unwrap();
    let mut bytes = std::fs::read(&entry).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0x10;
    std::fs::write(&entry, &bytes).unwrap();
    assert_eq!(cache.features(&last, &img, &views).unwrap(), last_stage);
    assert_ne!(std::fs::read(&entry).unwrap(), bytes, "the corrupt entry was rewritten");
    assert_eq!(cache.features(&last, &img, &views).unwrap(), last_stage);
    assert_eq!(count(), 4);

    // scoring several images in one flow batch equals scoring each image alone
    let mut cfg = differnet::flow::FlowConfig::new(ex.feature_dim());
    cfg.hidden = 16;
    let flow = differnet::flow::NormalizingFlow::new(cfg, 3, &Device::Cpu).unwrap();
    differnet::data::synth::generate(&dir.path().join("e"), 3, 0, 0, 5).unwrap();
    let paths: Vec<_> = (0..3).map(|i| dir.path().join(format!("e/train/good/{i:03}.png"))).collect();
    let batched = differnet::score::score_images(&flow, ScoreKind::Nll, &ex, &cache, &paths, &views, &differnet::progress::Silent).unwrap();
    for (p, b) in paths.iter().zip(&batched) {
        let alone = differnet::score::anomaly_score(
            &flow,
            &cache.features(&ex, p, &views).unwrap(),
            ex.feature_dim(),
            ScoreKind::Nll,
            views.len(),
            &Device::Cpu,
        )
        .unwrap();
        // equal up to rounding: OpenBLAS's kernels may round differently for other batch sizes
        assert!((alone - b).abs() < 1e-6 * alone.abs().max(1.0), "{alone} vs {b}");
    }
    assert!(differnet::score::score_images(&flow, ScoreKind::Nll, &ex, &cache, &paths, &[], &differnet::progress::Silent).is_err());
}

fn walk(p: &std::path::Path) -> usize {
    std::fs::read_dir(p).map(|rd| rd.filter_map(|e| e.ok()).map(|e| if e.path().is_dir() { walk(&e.path()) } else { 1 }).sum()).unwrap_or(0)
}

#[test]
fn synthetic_data_is_deterministic_and_masked() {
    let dir = tempfile::tempdir().unwrap();
    differnet::data::synth::generate(&dir.path().join("a"), 2, 1, 1, 5).unwrap();
    differnet::data::synth::generate(&dir.path().join("b"), 2, 1, 1, 5).unwrap();
    for rel in ["train/good/001.png", "test/crack/000.png", "ground_truth/spot/000_mask.png"] {
        assert_eq!(std::fs::read(dir.path().join("a").join(rel)).unwrap(), std::fs::read(dir.path().join("b").join(rel)).unwrap(), "{rel}");
    }
    let ds = differnet::data::Dataset::open(&dir.path().join("a")).unwrap();
    assert_eq!(ds.train.len(), 2);
    assert_eq!(ds.test.len(), 4);
    for s in ds.test.iter().filter(|s| s.is_defect()) {
        let m = load_rgb(s.mask.as_ref().unwrap()).unwrap();
        assert!(m.data.contains(&255), "{} mask is empty", s.path.display());
    }
}

#[test]
fn checkpoints_equal_shorter_runs_with_the_same_seed() {
    use differnet::flow::train::{train_flow_with_checkpoints, Checkpoint};
    let feats = random_features(5, 4, 12, 8);
    let mut seen = vec![];
    let mut save =
        |epoch: usize, flow: &differnet::flow::NormalizingFlow, s: &differnet::flow::train::TrainingSummary| -> differnet::Result<()> {
            assert_eq!(s.epochs, epoch);
            assert_eq!(s.epoch_losses.len(), epoch);
            seen.push((epoch, params(flow)));
            Ok(())
        };
    let cfg = tiny_config(6);
    train_flow_with_checkpoints(&feats, &cfg, &Device::Cpu, &differnet::progress::Silent, Some(Checkpoint { every: 2, save: &mut save }))
        .unwrap();
    assert_eq!(seen.iter().map(|s| s.0).collect::<Vec<_>>(), vec![2, 4]);
    let mut short = cfg.clone();
    short.epochs = 2;
    let (two, _) = train_flow(&feats, &short, &Device::Cpu, &differnet::progress::Silent).unwrap();
    assert_eq!(seen[0].1, params(&two));
}

#[test]
fn training_takes_mixed_images_and_a_single_one() {
    let ex =
        Extractor::load(BackboneKind::EfficientnetLite0, &shared().join("fixtures/efficientnet_lite0.safetensors"), &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let gray = dir.path().join("gray.png");
    image::GrayImage::from_fn(30, 20, |x, y| image::Luma([(x * 7 + y) as u8])).save(&gray).unwrap();
    let rgba = dir.path().join("rgba.png");
    image::RgbaImage::from_fn(50, 70, |x, y| image::Rgba([x as u8, y as u8, 7, 100])).save(&rgba).unwrap();
    let deep = dir.path().join("deep.tif");
    image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(64, 64, |x, y| image::Rgb([x as u8 * 4, y as u8 * 4, 0])))
        .to_rgb16()
        .save(&deep)
        .unwrap();
    let mut cfg = tiny_config(0);
    cfg.backbone = BackboneKind::EfficientnetLite0;
    cfg.set_stages(ex.stages()).unwrap();
    cfg.flow.hidden = 16;
    cfg.cached_views = 2;
    cfg.views_per_image = 2;
    let cache = FeatureCache { dir: None };
    let images = vec![gray, rgba, deep];
    let feats = differnet::flow::train::training_features(&images, &cfg, &ex, &cache, &differnet::progress::Silent).unwrap();
    assert!(feats.iter().all(|f| f.len() == 2 * ex.feature_dim() && f.iter().all(|v| v.is_finite())));
    train_flow(&feats, &cfg, &Device::Cpu, &differnet::progress::Silent).unwrap();
    // a single training image trains too (batches of one image)
    let (_, summary) = train_flow(&feats[..1], &cfg, &Device::Cpu, &differnet::progress::Silent).unwrap();
    assert_eq!(summary.epoch_losses.len(), cfg.epochs);
    // no images at all: an error that says so
    let e = train_flow(&[], &cfg, &Device::Cpu, &differnet::progress::Silent).err().unwrap().to_string();
    assert!(e.contains("no training images"), "{e}");
}

#[test]
fn threads_filling_one_cache_at_once_all_get_the_right_features() {
    let weights = shared().join("fixtures/efficientnet_lite0.safetensors");
    let ex = Extractor::load(BackboneKind::EfficientnetLite0, &weights, &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    differnet::data::synth::generate(&dir.path().join("d"), 3, 0, 0, 4).unwrap();
    let paths: Vec<_> = (0..3).map(|i| dir.path().join(format!("d/train/good/{i:03}.png"))).collect();
    let views = vec![View::rotation(0.0)];
    let fresh: Vec<_> = paths.iter().map(|p| FeatureCache { dir: None }.features(&ex, p, &views).unwrap()).collect();
    let cache = FeatureCache { dir: Some(dir.path().join("cache")) };
    std::thread::scope(|s| {
        for t in 0..4 {
            let (cache, ex, paths, views, fresh) = (&cache, &ex, &paths, &views, &fresh);
            s.spawn(move || {
                for round in 0..3 {
                    for (i, p) in paths.iter().enumerate().cycle().skip(t).take(paths.len()) {
                        assert_eq!(&cache.features(ex, p, views).unwrap(), &fresh[i], "thread {t} round {round} image {i}");
                    }
                }
            });
        }
    });
    // one entry per image, no temp files left
    assert_eq!(walk(&dir.path().join("cache")), paths.len());
}
