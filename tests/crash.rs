//! `kill -9` while a model is being rewritten never leaves a broken model where a good one stood.

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
