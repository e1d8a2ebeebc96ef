//! Evaluation reports: `results.json`, a Markdown summary and one self-contained HTML page with
//! the ROC curve (paper fig. 5), the score histogram (fig. 6), confusion counts and hard cases.

use crate::error::{write_atomic, Error, Result};
use crate::eval::evaluation::{Evaluation, SampleScore};
use base64::Engine;
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::{Path, PathBuf};

/// Font family name the plots ask for (registered by [`ensure_font`]).
const FONT: &str = "sans-serif";

/// TrueType fonts tried for plot labels, after `$DIFFERNET_FONT`.
const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/Library/Fonts/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

/// Registers a TrueType font for plot text (once per process): `$DIFFERNET_FONT` or a common
/// system font (Debian: package `fonts-dejavu-core`).
pub fn ensure_font() -> Result<()> {
    static FONT_READY: std::sync::OnceLock<std::result::Result<(), String>> = std::sync::OnceLock::new();
    FONT_READY
        .get_or_init(|| {
            let env = std::env::var_os("DIFFERNET_FONT").map(PathBuf::from);
            let path = env.iter().cloned().chain(FONT_CANDIDATES.iter().map(PathBuf::from)).find(|p| p.is_file()).ok_or_else(|| {
                "no TrueType font for plot labels: install one (Debian: fonts-dejavu-core) or set DIFFERNET_FONT=/path/to/font.ttf"
                    .to_string()
            })?;
            let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            // plotters keeps fonts for the life of the process
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font(FONT, FontStyle::Normal, bytes)
                .map_err(|_| format!("{}: not a usable TrueType font", path.display()))
        })
        .clone()
        .map_err(Error::Config)
}

/// A figure of a report, drawn with plotters into SVG or PNG.
pub enum Plot {
    /// ROC curve: (false-positive rate, true-positive rate) points and the AUROC.
    Roc { curve: Vec<(f64, f64)>, auroc: f64 },
    /// Histogram of the scores of good and defective images, with the decision threshold.
    Histogram { good: Vec<f64>, defect: Vec<f64>, threshold: Option<f64> },
    /// Named series of (x, y) points, e.g. AUROC against training set size.
    Lines { title: String, x_label: String, y_label: String, series: Vec<(String, Vec<(f64, f64)>)> },
}

const PALETTE: [RGBColor; 5] =
    [RGBColor(31, 119, 180), RGBColor(214, 39, 40), RGBColor(44, 160, 44), RGBColor(255, 127, 14), RGBColor(148, 103, 189)];

fn padded_range(values: impl Iterator<Item = f64> + Clone) -> (f64, f64) {
    let lo = values.clone().fold(f64::INFINITY, f64::min);
    let hi = values.fold(f64::NEG_INFINITY, f64::max);
    if !lo.is_finite() || !hi.is_finite() {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.05).max(1e-6);
    (lo - pad, hi + pad)
}

impl Plot {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> std::result::Result<(), String> {
        let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
        root.fill(&WHITE).map_err(e)?;
        match self {
            Plot::Roc { curve, auroc } => {
                let mut chart = ChartBuilder::on(root)
                    .caption(format!("ROC curve (AUROC {auroc:.4})"), (FONT, 18))
                    .margin(12)
                    .x_label_area_size(40)
                    .y_label_area_size(48)
                    .build_cartesian_2d(0f64..1f64, 0f64..1.001f64)
                    .map_err(e)?;
                chart
                    .configure_mesh()
                    .x_desc("false-positive rate")
                    .y_desc("true-positive rate")
                    .label_style((FONT, 12))
                    .draw()
                    .map_err(e)?;
                chart.draw_series(LineSeries::new([(0.0, 0.0), (1.0, 1.0)], RGBColor(170, 170, 170))).map_err(e)?;
                chart.draw_series(LineSeries::new(curve.iter().copied(), PALETTE[0].stroke_width(2))).map_err(e)?;
            }
            Plot::Histogram { good, defect, threshold } => {
                // as the paper's fig. 6: the axis ends where the good scores and most defect
                // scores end; the last bin collects everything above
                let mut all: Vec<f64> = good.iter().chain(defect.iter()).copied().filter(|v| v.is_finite()).collect();
                all.sort_by(f64::total_cmp);
                let q90 = all.get(all.len() * 9 / 10).copied().unwrap_or(1.0);
                let max_good = good.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let cap = (q90.max(max_good).max(threshold.unwrap_or(f64::NEG_INFINITY)) * 1.1).min(all.last().copied().unwrap_or(1.0));
                let clipped = all.last().is_some_and(|m| *m > cap);
                let (lo, hi) = padded_range(all.iter().copied().filter(|v| *v <= cap).chain(threshold.iter().copied()));
                const BINS: usize = 40;
                let width = (hi - lo) / BINS as f64;
                let count = |xs: &[f64]| {
                    let mut c = vec![0usize; BINS];
                    for x in xs.iter().filter(|x| x.is_finite()) {
                        c[(((x - lo).max(0.0) / width) as usize).min(BINS - 1)] += 1;
                    }
                    c
                };
                let (cg, cd) = (count(good), count(defect));
                let top = cg.iter().chain(&cd).copied().max().unwrap_or(1).max(1) as f64 * 1.1;
                let mut chart = ChartBuilder::on(root)
                    .caption("anomaly scores", (FONT, 18))
                    .margin(12)
                    .x_label_area_size(40)
                    .y_label_area_size(48)
                    .build_cartesian_2d(lo..hi, 0f64..top)
                    .map_err(e)?;
                let x_desc = if clipped { format!("score (last bin: all scores above {hi:.2})") } else { "score".to_string() };
                chart.configure_mesh().x_desc(x_desc).y_desc("images").label_style((FONT, 12)).draw().map_err(e)?;
                for (name, counts, color) in [("good", &cg, PALETTE[2]), ("defective", &cd, PALETTE[1])] {
                    chart
                        .draw_series(counts.iter().enumerate().filter(|(_, c)| **c > 0).map(|(i, c)| {
                            let x0 = lo + i as f64 * width;
                            Rectangle::new([(x0, 0.0), (x0 + width, *c as f64)], color.mix(0.55).filled())
                        }))
                        .map_err(e)?
                        .label(format!("{name} ({})", counts.iter().sum::<usize>()))
                        .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], color.mix(0.55).filled()));
                }
                if let Some(t) = threshold {
                    chart
                        .draw_series(LineSeries::new([(*t, 0.0), (*t, top)], BLACK.stroke_width(2)))
                        .map_err(e)?
                        .label(format!("threshold {t:.4}"))
                        .legend(|(x, y)| PathElement::new([(x, y), (x + 14, y)], BLACK.stroke_width(2)));
                }
                chart
                    .configure_series_labels()
                    .label_font((FONT, 12))
                    .background_style(WHITE.mix(0.85))
                    .border_style(BLACK)
                    .draw()
                    .map_err(e)?;
            }
            Plot::Lines { title, x_label, y_label, series } => {
                let (x0, x1) = padded_range(series.iter().flat_map(|s| s.1.iter().map(|p| p.0)));
                let (y0, y1) = padded_range(series.iter().flat_map(|s| s.1.iter().map(|p| p.1)));
                let mut chart = ChartBuilder::on(root)
                    .caption(title, (FONT, 18))
                    .margin(12)
                    .x_label_area_size(40)
                    .y_label_area_size(56)
                    .build_cartesian_2d(x0..x1, y0..y1)
                    .map_err(e)?;
                chart.configure_mesh().x_desc(x_label.as_str()).y_desc(y_label.as_str()).label_style((FONT, 12)).draw().map_err(e)?;
                for (i, (name, points)) in series.iter().enumerate() {
                    let color = PALETTE[i % PALETTE.len()];
                    chart
                        .draw_series(LineSeries::new(points.iter().copied(), color.stroke_width(2)).point_size(3))
                        .map_err(e)?
                        .label(name.as_str())
                        .legend(move |(x, y)| PathElement::new([(x, y), (x + 14, y)], color.stroke_width(2)));
                }
                chart
                    .configure_series_labels()
                    .label_font((FONT, 12))
                    .background_style(WHITE.mix(0.85))
                    .border_style(BLACK)
                    .draw()
                    .map_err(e)?;
            }
        }
        root.present().map_err(e)
    }

    /// The figure as an SVG document.
    pub fn svg(&self, width: u32, height: u32) -> Result<String> {
        ensure_font()?;
        let mut s = String::new();
        {
            let root = SVGBackend::with_string(&mut s, (width, height)).into_drawing_area();
            self.draw(&root).map_err(|e| Error::Config(format!("plot: {e}")))?;
        }
        Ok(s)
    }

    /// The figure as PNG bytes.
    pub fn png(&self, width: u32, height: u32) -> Result<Vec<u8>> {
        ensure_font()?;
        let mut rgb = vec![0u8; (width * height * 3) as usize];
        {
            let root = BitMapBackend::with_buffer(&mut rgb, (width, height)).into_drawing_area();
            self.draw(&root).map_err(|e| Error::Config(format!("plot: {e}")))?;
        }
        let img = image::RgbImage::from_raw(width, height, rgb).expect("buffer sized for the image");
        Ok(crate::views::png_bytes(&img))
    }
}

/// One image of the gallery: a case an engineer should look at.
pub struct GalleryItem {
    pub sample: SampleScore,
    /// Why it is shown, e.g. "good, scored high".
    pub reason: String,
    /// Overlay PNG (image, heat map and contour).
    pub overlay_png: Vec<u8>,
}

/// The `k` highest-scoring good images and the `k` lowest-scoring defective ones.
pub fn hard_cases(ev: &Evaluation, k: usize) -> Vec<(SampleScore, String)> {
    let mut good: Vec<&SampleScore> = ev.samples.iter().filter(|s| s.defect == "good").collect();
    let mut bad: Vec<&SampleScore> = ev.samples.iter().filter(|s| s.defect != "good").collect();
    good.sort_by(|a, b| b.score.total_cmp(&a.score));
    bad.sort_by(|a, b| a.score.total_cmp(&b.score));
    let g = good.into_iter().take(k).map(|s| (s.clone(), "good image with a high score".to_string()));
    let d = bad.into_iter().take(k).map(|s| (s.clone(), format!("{} with a low score", s.defect)));
    g.chain(d).collect()
}

/// What a report shows.
pub struct Report<'a> {
    pub title: String,
    /// Model file the evaluation used.
    pub model: String,
    pub evaluation: &'a Evaluation,
    pub gallery: Vec<GalleryItem>,
}

/// Files written by [`write_report`].
#[derive(Clone, Debug, serde::Serialize)]
pub struct ReportFiles {
    pub html: PathBuf,
    pub markdown: PathBuf,
    pub json: PathBuf,
    pub roc_png: PathBuf,
    pub histogram_png: PathBuf,
}

fn score_name(k: crate::score::ScoreKind) -> String {
    serde_json::to_value(k).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn data_uri(png: &[u8]) -> String {
    format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(png))
}

impl Report<'_> {
    fn plots(&self) -> (Plot, Plot) {
        let ev = self.evaluation;
        let scores: Vec<f64> = ev.samples.iter().map(|s| s.score).collect();
        let labels: Vec<bool> = ev.samples.iter().map(|s| s.defect != "good").collect();
        let roc = Plot::Roc { curve: crate::eval::metrics::roc_curve(&scores, &labels), auroc: ev.image_auroc };
        let (d, g): (Vec<&SampleScore>, Vec<&SampleScore>) = ev.samples.iter().partition(|s| s.defect != "good");
        let hist = Plot::Histogram {
            good: g.iter().map(|s| s.score).collect(),
            defect: d.iter().map(|s| s.score).collect(),
            threshold: ev.threshold,
        };
        (roc, hist)
    }

    /// Rows (name, images, AUROC, pixel AUROC, AUPRO) per defect type and overall.
    fn rows(&self) -> Vec<[String; 5]> {
        let ev = self.evaluation;
        let f = |v: Option<f64>| v.map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into());
        let pixel = |t: &str| ev.pixel.as_ref().and_then(|p| p.per_defect.get(t).copied());
        let mut rows: Vec<[String; 5]> = ev
            .per_defect_auroc
            .iter()
            .map(|(t, a)| {
                let n = ev.samples.iter().filter(|s| &s.defect == t).count();
                [t.clone(), n.to_string(), f(Some(*a)), f(pixel(t).map(|p| p.0)), f(pixel(t).map(|p| p.1))]
            })
            .collect();
        rows.push([
            "all".into(),
            (ev.n_good + ev.n_defect).to_string(),
            f(Some(ev.image_auroc)),
            f(ev.pixel.as_ref().map(|p| p.pixel_auroc)),
            f(ev.pixel.as_ref().map(|p| p.aupro)),
        ]);
        rows
    }

    fn confusion_line(&self) -> String {
        match (self.evaluation.threshold, self.evaluation.confusion) {
            (Some(t), Some((tp, fp, tn, fn_))) => {
                format!("At the stored threshold {t:.5}: {tp} defects caught, {fn_} missed; {tn} good parts passed, {fp} rejected.")
            }
            _ => "The model has no stored threshold (set one with `differnet calibrate`); no confusion counts.".into(),
        }
    }

    /// Recall at the operating points of [`Evaluation::operating_points`] (FPR 0, 1%, 5%), and
    /// the AUROC of the maps' maxima when maps were computed.
    fn operating_line(&self) -> String {
        let ev = self.evaluation;
        let mut s = String::new();
        if !ev.operating_points.is_empty() {
            let points: Vec<String> =
                ev.operating_points.iter().map(|p| format!("{:.1}% at {:.0}% false positives", 100.0 * p.recall, 100.0 * p.fpr)).collect();
            s += &format!(
                "Recall of defective images: {} (thresholds chosen on these good test images: operating points, not a calibration).",
                points.join(", ")
            );
        }
        if let Some(a) = ev.map_max_auroc {
            s += &format!(" Image AUROC of the anomaly maps' maxima: {a:.4}.");
        }
        s.trim_start().to_string()
    }

    fn markdown(&self) -> String {
        let ev = self.evaluation;
        let mut s = format!(
            "# {}\n\nModel `{}`, backbone {}, {} test views, score {}.\n\n",
            self.title,
            self.model,
            ev.backbone,
            ev.test_views,
            score_name(ev.score_kind)
        );
        s += "| defect type | images | image AUROC | pixel AUROC | AUPRO |\n|---|---|---|---|---|\n";
        for r in self.rows() {
            s += &format!("| {} |\n", r.join(" | "));
        }
        s += &format!(
            "\n{} ({} good, {} defective images.)\n\n{}\n\n![ROC curve](roc.png)\n![score histogram](histogram.png)\n",
            self.confusion_line(),
            ev.n_good,
            ev.n_defect,
            self.operating_line()
        );
        if !self.gallery.is_empty() {
            s += "\n## Cases to look at\n\n";
            for (i, g) in self.gallery.iter().enumerate() {
                s += &format!("- {}: `{}` score {:.5}: ![](gallery/{i:02}.png)\n", g.reason, g.sample.path, g.sample.score);
            }
        }
        s
    }

    fn html(&self, roc_svg: &str, hist_svg: &str) -> String {
        let ev = self.evaluation;
        let mut table =
            String::from("<table><tr><th>defect type</th><th>images</th><th>image AUROC</th><th>pixel AUROC</th><th>AUPRO</th></tr>");
        for r in self.rows() {
            table += "<tr>";
            for c in r {
                table += &format!("<td>{}</td>", escape(&c));
            }
            table += "</tr>";
        }
        table += "</table>";
        let mut gallery = String::new();
        for g in &self.gallery {
            gallery += &format!(
                "<figure><img src=\"{}\" alt=\"overlay\"><figcaption><b>{}</b><br>score {:.5}<br><code>{}</code></figcaption></figure>",
                data_uri(&g.overlay_png),
                escape(&g.reason),
                g.sample.score,
                escape(&g.sample.path)
            );
        }
        if gallery.is_empty() {
            gallery = "<p>No gallery (run with heat maps to see the hardest cases).</p>".into();
        }
        format!(
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title><style>\
body{{font-family:sans-serif;margin:2em;color:#222;max-width:1200px}} table{{border-collapse:collapse;margin:1em 0}}\
td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}} td:first-child,th:first-child{{text-align:left}}\
.plots{{display:flex;flex-wrap:wrap;gap:1em}} .gallery{{display:flex;flex-wrap:wrap;gap:1em}}\
figure{{margin:0;width:260px}} figure img{{width:260px;border:1px solid #ccc}} figcaption{{font-size:12px;word-break:break-all}}\
</style></head><body>\n<h1>{title}</h1>\n<p>Model <code>{model}</code>, backbone {backbone}, {views} test views, score {score}; \
{n_good} good and {n_defect} defective test images.</p>\n<h2>Results</h2>\n{table}\n<p id=\"confusion\">{confusion}</p>\n<p id=\"operating-points\">{operating}</p>\n\
<h2>Figures</h2>\n<div class=\"plots\">{roc}{hist}</div>\n<h2>Cases to look at</h2>\n<div class=\"gallery\">{gallery}</div>\n</body></html>\n",
            title = escape(&self.title),
            model = escape(&self.model),
            backbone = escape(&ev.backbone),
            views = ev.test_views,
            score = score_name(ev.score_kind),
            n_good = ev.n_good,
            n_defect = ev.n_defect,
            table = table,
            confusion = escape(&self.confusion_line()),
            operating = escape(&self.operating_line()),
            roc = roc_svg,
            hist = hist_svg,
            gallery = gallery,
        )
    }
}

/// Writes `index.html` (self-contained: plots inline as SVG, images as data URIs), `summary.md`
/// with `roc.png`, `histogram.png` and `gallery/*.png` beside it, and `results.json` into `dir`.
pub fn write_report(dir: &Path, report: &Report) -> Result<ReportFiles> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let (roc, hist) = report.plots();
    let files = ReportFiles {
        html: dir.join("index.html"),
        markdown: dir.join("summary.md"),
        json: dir.join("results.json"),
        roc_png: dir.join("roc.png"),
        histogram_png: dir.join("histogram.png"),
    };
    write_atomic(&files.roc_png, &roc.png(560, 420)?)?;
    write_atomic(&files.histogram_png, &hist.png(560, 420)?)?;
    for (i, g) in report.gallery.iter().enumerate() {
        write_atomic(&dir.join("gallery").join(format!("{i:02}.png")), &g.overlay_png)?;
    }
    let json = serde_json::to_string_pretty(report.evaluation).map_err(|e| Error::Config(e.to_string()))?;
    write_atomic(&files.json, json.as_bytes())?;
    write_atomic(&files.markdown, report.markdown().as_bytes())?;
    write_atomic(&files.html, report.html(&roc.svg(560, 420)?, &hist.svg(560, 420)?).as_bytes())?;
    Ok(files)
}

/// Overlays of the [`hard_cases`] of an evaluation, from maps of the style's kind over `views`.
pub fn gallery(
    d: &crate::pipeline::Detector,
    ev: &Evaluation,
    k: usize,
    views: &[crate::views::View],
    style: &crate::localize::render::MapStyle,
    bar: &dyn crate::progress::Progress,
) -> Result<Vec<GalleryItem>> {
    let cases = hard_cases(ev, k);
    bar.set_length(cases.len() as u64);
    let mut out = vec![];
    for (sample, reason) in cases {
        let pictures = d.localization_images(&crate::pipeline::Detector::read_image(Path::new(&sample.path))?, views, style)?;
        out.push(GalleryItem { sample, reason, overlay_png: crate::views::png_bytes(&pictures.overlay) });
        bar.inc(1);
    }
    Ok(out)
}
