//! A model save that is killed (`kill -9`) or runs out of space never leaves a broken model where a good one stood;
//! heat maps that do not fit fail naming the file, cache entries that do not fit only warn.

mod common;
use common::*;
use differnet::model::Model;
use std::process::Command;
use std::time::Duration;

#[test]
fn killing_a_model_write_leaves_the_old_or_the_new_model() {
    let home = home_with_efficientnet();
    let path = home.path().join("m.safetensors");
    // a flow of width 512 (about 80 MB) so that writing it takes a while
    efficientnet_model(512, Some(0.5), 1).save(&path).unwrap();
    let mut allowed = vec![0.5];
    let mut completed = 0;
    for (i, delay_ms) in [30u64, 120, 250, 400, 600, 900, 1400, 2500].into_iter().enumerate() {
        let value = 10.0 + i as f64;
        let mut child = Command::new(env!("CARGO_BIN_EXE_differnet"))
            .args(["--quiet", "calibrate", "--model", path.to_str().unwrap(), "--value", &value.to_string()])
            .env("DIFFERNET_HOME", home.path())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        if child.try_wait().unwrap().is_some() {
            completed += 1;
        } else {
            child.kill().unwrap(); // SIGKILL
        }
        child.wait().unwrap();
        allowed.push(value);
        let model = Model::load(&path, &candle_core::Device::Cpu).unwrap_or_else(|e| panic!("after kill {i} ({delay_ms} ms): {e}"));
        let t = model.manifest.threshold.unwrap().value;
        assert!(allowed.contains(&t), "threshold {t} is neither an old nor the new value");
    }
    eprintln!("{completed} of 8 writes finished before the kill");
}

/// Runs `differnet ARGS` with file sizes limited to `limit_kib` (RLIMIT_FSIZE, SIGXFSZ ignored,
/// so a write past it fails with EFBIG as a full disk fails with ENOSPC).
fn differnet_with_file_limit(home: &std::path::Path, limit_kib: u64, args: &[&str]) -> std::process::Output {
    let quoted: Vec<String> = args.iter().map(|a| format!("'{a}'")).collect();
    let script = format!("trap '' XFSZ; ulimit -f {}; exec '{}' {}", limit_kib * 2, env!("CARGO_BIN_EXE_differnet"), quoted.join(" "));
    Command::new("sh").args(["-c", &script]).env("DIFFERNET_HOME", home).output().unwrap()
}

#[test]
fn a_save_that_runs_out_of_space_names_the_file_and_keeps_the_old_model() {
    let home = home_with_efficientnet();
    let dir = home.path().join("models");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("m.safetensors");
    efficientnet_model(64, Some(0.5), 1).save(&path).unwrap();
    let before = std::fs::read(&path).unwrap();
    assert!(before.len() > 1 << 20, "the model is larger than the limit below");
    // 512 KiB: less than the model file
    let out = differnet_with_file_limit(home.path(), 512, &["--quiet", "calibrate", "--model", path.to_str().unwrap(), "--value", "7"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the save cannot have succeeded: {stderr}");
    assert!(stderr.contains("m.safetensors") && stderr.to_lowercase().contains("too large"), "{stderr}");
    assert_eq!(std::fs::read(&path).unwrap(), before, "the old model is intact");
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, vec![std::ffi::OsString::from("m.safetensors")], "no partial file is left behind");
    // without the limit the same command succeeds
    let ok = differnet_with_file_limit(home.path(), 1 << 30, &["--quiet", "calibrate", "--model", path.to_str().unwrap(), "--value", "7"]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    assert_eq!(Model::load(&path, &candle_core::Device::Cpu).unwrap().manifest.threshold.unwrap().value, 7.0);
}

/// Names of the files under `dir`, in subfolders too (empty when it does not exist).
fn names(dir: &std::path::Path) -> Vec<String> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).into_iter().flatten().map(|e| e.unwrap()) {
        if e.file_type().unwrap().is_dir() {
            out.extend(names(&e.path()));
        } else {
            out.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    out
}

#[test]
fn full_disk_while_writing_heat_maps_fails_naming_the_file_and_cache_writes_only_warn() {
    let home = home_with_efficientnet();
    let model = home.path().join("m.safetensors");
    efficientnet_model(16, Some(0.5), 1).save(&model).unwrap();
    let image = home.path().join("part.png");
    std::fs::write(&image, png_image(64, 48, 5)).unwrap();
    let (m, img) = (model.to_str().unwrap(), image.to_str().unwrap());

    // heat maps: each PNG is larger than 1 KiB, so the first one cannot be written
    let maps = home.path().join("maps");
    let out = differnet_with_file_limit(
        home.path(),
        1,
        &["--quiet", "localize", "--model", m, img, "--out", maps.to_str().unwrap(), "--views", "1", "--no-cache"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a heat map cannot have been written: {stderr}");
    assert!(stderr.contains("maps/part_") && stderr.to_lowercase().contains("too large"), "{stderr}");
    // nothing partial: every file there is a whole PNG, no temp file is left
    for name in names(&maps) {
        assert!(!name.ends_with(".tmp"), "temp file left: {name}");
        assert!(image::open(maps.join(&name)).is_ok(), "{name} is not a whole PNG");
    }

    // a cache entry (4.6 KB of features) that cannot be written: scoring warns and goes on
    let cache = home.path().join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    let args = ["--json", "predict", "--model", m, img, "--cache-dir", cache.to_str().unwrap()];
    let out = differnet_with_file_limit(home.path(), 1, &args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "a failed cache write must not fail scoring: {stderr}");
    assert!(stderr.contains("cache") && stderr.contains(cache.to_str().unwrap()), "the warning names the cache: {stderr}");
    let limited: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(names(&cache).iter().all(|n| !n.ends_with(".tmp")), "{:?}", names(&cache));
    // the score is the one an unlimited run gives
    let free = differnet_with_file_limit(home.path(), 1 << 30, &args);
    let unlimited: serde_json::Value = serde_json::from_slice(&free.stdout).unwrap();
    assert_eq!(limited[0]["score"], unlimited[0]["score"]);
}
