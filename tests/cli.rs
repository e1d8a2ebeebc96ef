//! The `differnet` binary end to end on a tiny generated dataset: train, test, predict,
//! calibrate, localize, report, info; bad input exits non-zero with a message naming the file.

mod common;
use common::*;

#[test]
fn train_test_predict_calibrate_and_errors() {
    let home = home_with_efficientnet();
    let data = home.path().join("data");
    differnet::data::synth::generate(&data, 4, 2, 1, 11).unwrap();
    let model = home.path().join("m.safetensors");
    let (d, m) = (data.to_str().unwrap(), model.to_str().unwrap());

    let (ok, _, err) = differnet_cli(
        home.path(),
        &[
            "--quiet",
            "train",
            "--data",
            d,
            "--out",
            m,
            "--schedule",
            "fast",
            "--epochs",
            "2",
            "--hidden",
            "32",
            "--cached-views",
            "2",
            "--views",
            "2",
            "--batch",
            "2",
            "--test-views",
            "2",
        ],
    );
    assert!(ok, "train failed: {err}");
    let (ok, out, err) =
        differnet_cli(home.path(), &["--quiet", "--json", "test", "--model", m, "--data", d, "--pixel-metrics", "--pixel-views", "1"]);
    assert!(ok, "test failed: {err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let pixel = v["pixel"]["pixel_auroc"].as_f64().unwrap();
    let aupro = v["pixel"]["aupro"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&pixel) && (0.0..=1.0).contains(&aupro), "{}", v["pixel"]);
    assert_eq!(v["pixel"]["per_defect"].as_object().unwrap().len(), 3);
    let auroc = v["image_auroc"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&auroc));
    assert_eq!(v["n_good"], 2);
    assert_eq!(v["n_defect"], 3);
    assert_eq!(v["per_defect_auroc"].as_object().unwrap().len(), 3);
    // the model keeps its stages (the default 3,4,5 of the fast schedule): another choice is refused
    let (ok, out, _) = differnet_cli(home.path(), &["info", m]);
    assert!(ok && out.contains("efficientnet-lite0") && out.contains("stages [3, 4, 5]") && out.contains("2 epochs"), "{out}");
    assert!(out.lines().count() < 12, "a summary, not the manifest: {out}");
    let (ok, out, _) = differnet_cli(home.path(), &["--json", "info", m]);
    assert!(ok);
    let manifest: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(manifest["train"]["stages"], serde_json::json!([3, 4, 5]));
    assert_eq!(manifest["flow"]["dim"], 3 * (80 + 112 + 192));
    // export: an f16 flow, half the parameter bytes, scores within 1e-3 relative; never over itself
    let small = home.path().join("m16.safetensors");
    let (ok, out, err) = differnet_cli(home.path(), &["--json", "export", m, "--out", small.to_str().unwrap()]);
    assert!(ok, "export failed: {err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let bytes = |k: &str| v[k].as_f64().unwrap();
    assert_eq!(bytes("flow_bytes_out") * 2.0, bytes("flow_bytes_in"), "{out}");
    // the file shrinks by the flow's half; the local density and manifest stay as they were
    let saved = bytes("bytes_in") - bytes("bytes_out");
    assert!((saved - bytes("flow_bytes_out")).abs() < 4096.0, "{out}");
    let (ok, out, _) = differnet_cli(home.path(), &["info", small.to_str().unwrap()]);
    assert!(ok && out.contains("flow stored as F16") && out.contains("v2"), "{out}");
    let good = data.join("test/good");
    let scores = |model: &str| -> Vec<f64> {
        let (ok, out, err) = differnet_cli(home.path(), &["--quiet", "--json", "predict", "--model", model, good.to_str().unwrap()]);
        assert!(ok, "predict failed: {err}");
        let rows: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
        rows.iter().map(|r| r["score"].as_f64().unwrap()).collect()
    };
    let (s32, s16) = (scores(m), scores(small.to_str().unwrap()));
    assert_eq!(s32.len(), 2);
    for (a, b) in s32.iter().zip(&s16) {
        assert!(((a - b) / a).abs() < 1e-3, "f32 {a} f16 {b}");
    }
    let (ok, _, err) = differnet_cli(home.path(), &["--quiet", "export", m, "--out", m]);
    assert!(!ok && err.contains("is the model itself"), "{err}");
    assert_eq!((manifest["train"]["epochs"].as_u64(), manifest["train"]["augment"]["rotate"].as_bool()), (Some(2), Some(false)));
    let (ok, _, err) = differnet_cli(home.path(), &["--quiet", "test", "--model", m, "--data", d, "--stages", "6"]);
    assert!(!ok && err.contains("stages [3, 4, 5]"), "{err}");

    let (ok, _, err) = differnet_cli(home.path(), &["--quiet", "calibrate", "--model", m, "--best-f1", "--data", d]);
    assert!(ok, "calibrate failed: {err}");
    let good = data.join("test/good");
    let maps = home.path().join("maps");
    let (ok, out, err) = differnet_cli(
        home.path(),
        &["--quiet", "--json", "predict", "--model", m, good.to_str().unwrap(), "--heatmaps", maps.to_str().unwrap(), "--views", "1"],
    );
    assert!(ok, "predict failed: {err}");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|r| r["score"].is_f64() && r["is_anomaly"].is_boolean()));
    for r in &rows {
        for kind in ["heatmap", "overlay", "mask"] {
            let img = image::open(r["maps"][kind].as_str().unwrap()).unwrap();
            assert_eq!((img.width(), img.height()), (224, 224), "{kind} at the image's own size");
        }
    }

    // heat maps against good images: refused before calibration, then stored in the model
    let defect_dir = data.join("test/crack");
    let (ok, _, err) = differnet_cli(
        home.path(),
        &["--quiet", "localize", "--model", m, defect_dir.to_str().unwrap(), "--out", maps.to_str().unwrap(), "--normalize", "good"],
    );
    assert!(!ok && err.contains("--localization-good"), "{err}");
    let (ok, _, err) = differnet_cli(
        home.path(),
        &["--quiet", "localize", "--model", m, defect_dir.to_str().unwrap(), "--out", maps.to_str().unwrap(), "--pixel-threshold", "1.5"],
    );
    assert!(!ok && err.contains("--pixel-threshold"), "{err}");
    let train_good = data.join("train/good");
    let (ok, out, err) = differnet_cli(
        home.path(),
        &["--quiet", "--json", "calibrate", "--model", m, "--localization-good", train_good.to_str().unwrap(), "--pixel-views", "1"],
    );
    assert!(ok, "calibrate --localization-good failed: {err}");
    let range: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(range["localization"]["high"].as_f64().unwrap() > range["localization"]["low"].as_f64().unwrap(), "{out}");
    assert_eq!(range["localization"]["images"], 4);
    let (ok, out, err) = differnet_cli(
        home.path(),
        &[
            "--quiet",
            "--json",
            "localize",
            "--model",
            m,
            defect_dir.to_str().unwrap(),
            "--out",
            maps.to_str().unwrap(),
            "--normalize",
            "good",
            "--views",
            "1",
        ],
    );
    assert!(ok, "{err}");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert!(image::open(rows[0]["mask"].as_str().unwrap()).is_ok());

    // a report folder: HTML, Markdown, plots, results
    let report = home.path().join("report");
    let (ok, out, err) = differnet_cli(
        home.path(),
        &[
            "--quiet",
            "--json",
            "report",
            "--model",
            m,
            "--data",
            d,
            "--out",
            report.to_str().unwrap(),
            "--gallery",
            "1",
            "--gallery-views",
            "1",
        ],
    );
    assert!(ok, "report failed: {err}");
    assert!(out.contains("index.html"), "{out}");
    for f in ["index.html", "summary.md", "results.json", "roc.png", "histogram.png", "gallery/00.png", "gallery/01.png"] {
        assert!(report.join(f).is_file(), "report lacks {f}");
    }
    let (ok, out, _) = differnet_cli(home.path(), &["info", m]);
    assert!(ok && out.contains("efficientnet-lite0") && out.contains("best-f1"), "{out}");

    // a threshold for a false-positive rate on good images also stores their score range, so
    // predictions carry pred_score; --csv holds the same rows as --json
    let (ok, _, err) =
        differnet_cli(home.path(), &["--quiet", "calibrate", "--model", m, "--fpr", "0.25", "--good", train_good.to_str().unwrap()]);
    assert!(ok, "calibrate --fpr failed: {err}");
    let mut test_dirs: Vec<String> =
        std::fs::read_dir(data.join("test")).unwrap().map(|e| e.unwrap().path().to_str().unwrap().to_string()).collect();
    test_dirs.sort();
    let csv = home.path().join("out.csv");
    let mut args = vec!["--quiet", "--json", "predict", "--model", m, "--csv", csv.to_str().unwrap()];
    args.extend(test_dirs.iter().map(String::as_str));
    let (ok, out, err) = differnet_cli(home.path(), &args);
    assert!(ok, "predict --csv failed: {err}");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let text = std::fs::read_to_string(&csv).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("image_path,pred_score,pred_label,score"));
    let parsed: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert_eq!(parsed.len(), rows.len());
    assert_eq!(rows.len(), 5);
    for (r, c) in rows.iter().zip(&parsed) {
        assert_eq!(c.len(), 4, "{c:?}");
        assert_eq!(c[0], r["path"].as_str().unwrap());
        let pred: f64 = c[1].parse().unwrap();
        assert!((0.0..=1.0).contains(&pred) && pred == r["pred_score"].as_f64().unwrap(), "{c:?} vs {r}");
        assert_eq!(c[2] == "1", r["pred_label"].as_bool().unwrap());
        assert_eq!(c[3].parse::<f64>().unwrap(), r["score"].as_f64().unwrap());
        assert_eq!(pred >= 0.5, r["pred_label"].as_bool().unwrap(), "pred_score is 0.5 at the threshold");
    }

    // bad input: a broken image, a missing model, an empty dataset, a missing backbone
    let broken = home.path().join("broken.jpg");
    std::fs::write(&broken, b"\xff\xd8\xff garbage").unwrap();
    let (ok, _, err) = differnet_cli(home.path(), &["--quiet", "predict", "--model", m, broken.to_str().unwrap()]);
    assert!(!ok && err.contains("broken.jpg"), "{err}");
    let (ok, _, err) = differnet_cli(home.path(), &["--quiet", "test", "--model", "nope.safetensors", "--data", d]);
    assert!(!ok && err.contains("nope.safetensors"), "{err}");
    let empty = home.path().join("empty");
    std::fs::create_dir_all(empty.join("train/good")).unwrap();
    let (ok, _, err) = differnet_cli(home.path(), &["--quiet", "train", "--data", empty.to_str().unwrap(), "--out", m]);
    assert!(!ok && err.contains("empty"), "{err}");
    let (ok, _, err) = differnet_cli(home.path(), &["--quiet", "train", "--backbone", "alexnet", "--data", d, "--out", m]);
    assert!(!ok && err.contains("weights fetch alexnet"), "{err}");
    // AlexNet weights a user supplies: a complete file is imported, an incomplete one refused
    let subset = shared().join("fixtures/alexnet_seed0_features_subset.pth");
    let (ok, _, err) = differnet_cli(home.path(), &["weights", "import", "alexnet", subset.to_str().unwrap()]);
    assert!(!ok && err.contains("features.3.weight"), "{err}");
    let full = shared().join("fixtures/alexnet_seed0_features.safetensors");
    let (ok, _, err) = differnet_cli(home.path(), &["weights", "import", "alexnet", full.to_str().unwrap()]);
    assert!(ok, "{err}");
    let (ok, out, _) = differnet_cli(home.path(), &["--json", "weights", "list"]);
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert!(ok && rows[..2].iter().all(|r| r["installed"] == true), "{out}");
    assert_eq!((rows[2]["backbone"].as_str(), rows[2]["installed"].as_bool()), (Some("vgg16"), Some(false)), "{out}");
    assert_eq!(rows[1]["info"]["source_sha256"], "f06ee7fd234fa31e624c46d94e3b9da841ad6466587a913bba3f50b2a4995b87");
    // the model is still the good one after the failed runs
    let (ok, _, err) = differnet_cli(home.path(), &["--quiet", "test", "--model", m, "--data", d]);
    assert!(ok, "{err}");
}

#[test]
fn bench_reports_the_issue_keys_and_an_end_to_end_run() {
    let home = home_with_efficientnet();
    let data = home.path().join("data");
    differnet::data::synth::generate(&data, 4, 2, 2, 3).unwrap();
    let args = [
        "--quiet",
        "--json",
        "bench",
        "--views",
        "4",
        "--flow-steps",
        "1",
        "--flow-batch",
        "8",
        "--hidden",
        "32",
        "--data",
        data.to_str().unwrap(),
        "--e2e-epochs",
        "1",
    ];
    let (ok, out, err) = differnet_cli(home.path(), &args);
    assert!(ok, "bench failed: {err}");
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    for key in [
        "conv_to_sgemm_ratio",
        "flow_train_samples_per_s",
        "test_seconds_per_image_64_views",
        "gradient_map_seconds_per_view",
        "gradient_map_to_forward_ratio",
        "feature_map_extra_seconds_per_image",
        "peak_rss_bytes",
        "e2e_seconds",
        "image_auroc",
    ] {
        assert!(r[key].as_f64().is_some_and(|v| v.is_finite() && v >= 0.0), "{key}: {}", r[key]);
    }
    assert!(r["backbone_views_per_s"].as_f64().unwrap() > 0.0);
    let settings = r["e2e_settings"].as_str().unwrap();
    assert!(settings.contains("train's defaults: 1 epochs") && settings.contains("rotation off"), "{settings}");
}
