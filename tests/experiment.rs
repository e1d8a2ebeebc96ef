//! `differnet experiment` end to end on generated categories: every experiment writes its table
//! with the paper's numbers, and a second run resumes from the finished cells.

mod common;
use common::*;
use std::path::Path;

fn table(home: &Path, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--quiet", "--json", "experiment"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--epochs", "2", "--hidden", "16", "--cached-views", "4", "--test-views", "4"]);
    let (ok, out, err) = differnet_cli(home, &all);
    assert!(ok, "experiment {args:?} failed: {err}");
    serde_json::from_str(&out).unwrap()
}

#[test]
fn experiments_write_tables_and_resume() {
    let home = home_with_efficientnet();
    let root = home.path().join("cats");
    differnet::data::synth::generate(&root.join("tile"), 6, 3, 1, 1).unwrap();
    differnet::data::synth::generate(&root.join("wood"), 6, 3, 1, 2).unwrap();
    let (tile, out) = (root.join("tile"), home.path().join("out"));
    let (tile, o) = (tile.to_str().unwrap(), out.to_str().unwrap());

    let t2 = table(home.path(), &["table2", "--data", tile, "--out", &format!("{o}/t2")]);
    let rows = t2["rows"].as_array().unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["tile OCSVM", "tile 1-NN", "tile DifferNet"]);
    assert_eq!(rows.iter().map(|r| r["paper"].as_f64().unwrap()).collect::<Vec<_>>(), [58.7, 80.0, 97.7]);
    assert!(rows.iter().all(|r| (0.0..=100.0).contains(&r["ours"].as_f64().unwrap())));
    let md = std::fs::read_to_string(out.join("t2/table.md")).unwrap();
    assert!(md.contains("| tile 1-NN |") && md.contains("| 80.0 |"), "{md}");

    // resume: the finished cells are reused as they are
    let cell = out.join("t2/cells/tile-differnet.json");
    let before = std::fs::read_to_string(&cell).unwrap();
    let again = table(home.path(), &["table2", "--data", tile, "--out", &format!("{o}/t2")]);
    assert_eq!(again["rows"], t2["rows"]);
    assert_eq!(std::fs::read_to_string(&cell).unwrap(), before);

    let t3 = table(home.path(), &["table3", "--data", tile, "--out", &format!("{o}/t3")]);
    let rows = t3["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 7);
    // with 4 test views, configurations B and G (64 views) cannot run and say why
    let missing: Vec<bool> = rows.iter().map(|r| r["ours"].is_null()).collect();
    assert_eq!(missing, [false, true, false, false, false, true, true]);
    assert!(rows[1]["note"].as_str().unwrap().contains("--test-views 64"));

    let fs = table(home.path(), &["fewshot", "--data", tile, "--out", &format!("{o}/fs"), "--shots", "2,4", "--subsets", "2"]);
    assert_eq!(fs["rows"].as_array().unwrap().len(), 2);
    assert!(fs["rows"][0]["note"].as_str().unwrap().starts_with("subsets: "));
    assert!(image::open(out.join("fs/fewshot.png")).is_ok());

    let mm = table(home.path(), &["multimodal", "--data", root.to_str().unwrap(), "--out", &format!("{o}/mm")]);
    let rows = mm["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[2]["paper"].as_f64(), Some(90.2));
    let mean = (rows[0]["ours"].as_f64().unwrap() + rows[1]["ours"].as_f64().unwrap()) / 2.0;
    assert!((rows[2]["ours"].as_f64().unwrap() - mean).abs() < 1e-9);
    assert!(mm["settings"]["train"]["flow"]["hidden"] == 16);
}
