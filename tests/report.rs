//! The evaluation report: files, plots, an offline page, and Chromium rendering it.

use differnet::eval::evaluation::{Evaluation, SampleScore};
use differnet::localize::render::render_localization;
use differnet::report::{hard_cases, write_report, GalleryItem, Report};
use differnet::score::ScoreKind;
use differnet::views::Rgb8;

fn evaluation() -> Evaluation {
    let mut samples = vec![];
    for i in 0..30 {
        samples.push(SampleScore {
            path: format!("test/good/{i:03}.png"),
            defect: "good".into(),
            score: 1.0 + (i as f64 * 0.37) % 1.0,
            map_max: None,
            flow_score: None,
        });
    }
    for i in 0..20 {
        let defect = if i % 2 == 0 { "crack" } else { "spot" };
        samples.push(SampleScore {
            path: format!("test/{defect}/{i:03}.png"),
            defect: defect.into(),
            score: 1.6 + (i as f64 * 0.53) % 1.5,
            map_max: None,
            flow_score: None,
        });
    }
    Evaluation::from_scores("efficientnet-lite0", samples, 16, ScoreKind::MeanZ2, Some(2.0))
}

fn gallery(ev: &Evaluation) -> Vec<GalleryItem> {
    hard_cases(ev, 2)
        .into_iter()
        .map(|(sample, reason)| {
            let original = Rgb8 { width: 64, height: 48, data: (0..64 * 48 * 3).map(|i| (i % 251) as u8).collect() };
            let n = differnet::backbone::INPUT_SIZE;
            let map: Vec<f32> = (0..n * n).map(|i| ((i % n) as f32 / n as f32).powi(2)).collect();
            let overlay = render_localization(&original, &map, 0.5).overlay;
            GalleryItem { sample, reason, overlay_png: differnet::views::png_bytes(&overlay) }
        })
        .collect()
}

fn find_chromium() -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .flat_map(|name| std::env::split_paths(&path).map(move |d| d.join(name)))
        .find(|p| p.is_file())
}

#[test]
fn report_is_complete_offline_and_renders_in_chromium() {
    let ev = evaluation();
    let cases = hard_cases(&ev, 2);
    assert_eq!(cases.len(), 4);
    // highest-scoring good first, then the lowest-scoring defects
    let top_good = ev.samples.iter().filter(|s| s.defect == "good").map(|s| s.score).fold(f64::MIN, f64::max);
    assert_eq!(cases[0].0.score, top_good);
    let low_defect = ev.samples.iter().filter(|s| s.defect != "good").map(|s| s.score).fold(f64::MAX, f64::min);
    assert_eq!(cases[2].0.score, low_defect);

    let dir = tempfile::tempdir().unwrap();
    let report = Report { title: "synthetic <check> & co".into(), model: "m.safetensors".into(), evaluation: &ev, gallery: gallery(&ev) };
    let files = write_report(dir.path(), &report).unwrap();

    let html = std::fs::read_to_string(&files.html).unwrap();
    assert_eq!(html.matches("<svg").count(), 2, "ROC and histogram inline");
    assert_eq!(html.matches("src=\"data:image/png;base64,").count(), 4, "gallery embedded");
    assert!(html.contains("synthetic &lt;check&gt; &amp; co"), "title escaped");
    for remote in ["src=\"http", "href=\"http", "url(http", "<script"] {
        assert!(!html.contains(remote), "page must work offline: found {remote}");
    }
    let (tp, fp, tn, fn_) = ev.confusion.unwrap();
    assert!(html.contains(&format!("{tp} defects caught, {fn_} missed; {tn} good parts passed, {fp} rejected")));
    // the operating points a line engineer asks for: recall at 0, 1 and 5% false positives
    assert_eq!(ev.operating_points.len(), 3);
    for p in &ev.operating_points {
        let text = format!("{:.1}% at {:.0}% false positives", 100.0 * p.recall, 100.0 * p.fpr);
        assert!(html.contains(&text), "html lacks {text}");
    }
    let md = std::fs::read_to_string(&files.markdown).unwrap();
    assert!(md.contains(&format!("| all | 50 | {:.4} | - | - |", ev.image_auroc)), "{md}");
    assert!(md.contains("| crack | 10 |"));
    assert!(md.contains("% at 0% false positives") && md.contains("% at 5% false positives"), "{md}");
    let json: Evaluation = serde_json::from_str(&std::fs::read_to_string(&files.json).unwrap()).unwrap();
    assert_eq!(json.samples.len(), 50);
    for png in [&files.roc_png, &files.histogram_png] {
        let img = image::open(png).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (560, 420));
        let colours: std::collections::HashSet<[u8; 3]> = img.pixels().map(|p| p.0).collect();
        assert!(colours.len() > 20, "{} looks blank", png.display());
    }
    assert_eq!(std::fs::read_dir(dir.path().join("gallery")).unwrap().count(), 4);

    let Some(chromium) = find_chromium() else {
        assert!(std::env::var_os("CI").is_none(), "CI must install Debian's chromium (see .ci/run)");
        eprintln!("chromium not found: skipping the rendering check (apt-get install chromium)");
        return;
    };
    let shot = dir.path().join("screenshot.png");
    let profile = dir.path().join("chromium-profile");
    let out = std::process::Command::new(chromium)
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking"])
        .args(["--disable-component-update", "--disable-sync", "--hide-scrollbars", "--window-size=1200,1400"])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("--screenshot={}", shot.display()))
        .arg(format!("file://{}", files.html.display()))
        .output()
        .unwrap();
    assert!(shot.is_file(), "no screenshot: {}", String::from_utf8_lossy(&out.stderr));
    let img = image::open(&shot).unwrap().to_rgb8();
    // the ROC curve's colour drawn by the inline SVG, and the gallery's overlays, are on the page
    let near = |p: &image::Rgb<u8>, c: [i32; 3]| (0..3).all(|i| (p.0[i] as i32 - c[i]).abs() < 12);
    let roc_pixels = img.pixels().filter(|p| near(p, [31, 119, 180])).count();
    assert!(roc_pixels > 200, "ROC curve not rendered ({roc_pixels} pixels)");
    let contour_pixels = img.pixels().filter(|p| near(p, [0, 255, 128])).count();
    assert!(contour_pixels > 50, "gallery overlays not rendered ({contour_pixels} contour pixels)");
}
