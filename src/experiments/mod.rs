//! The paper's experiments (section 4) as resumable runs: baselines (tables 1-2), ablation
//! (table 3), few-shot (table 1, fig. 7) and multimodal (4.5), our numbers beside the paper's.

pub mod baselines;

use crate::data::Dataset;
use crate::error::{write_atomic, Error, Result};
use crate::eval::metrics::auroc;
use crate::features::{Extractor, FeatureCache};
use crate::flow::train::{train_flow, training_features, TrainConfig};
use crate::flow::NormalizingFlow;
use crate::progress::Progress;
use crate::score::ScoreKind;
use crate::views::{test_views, Augment};
use baselines::Baseline;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::path::{Path, PathBuf};

/// Which experiment of the paper.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExperimentKind {
    /// Table 1: OCSVM, 1-NN, DifferNet and DifferNet on 16 shots per MVTec AD category.
    Table1,
    /// Table 2: OCSVM, 1-NN and DifferNet on one dataset (the paper: Magnetic Tile Defects).
    Table2,
    /// Table 3: ablation A-G (multi-scale, training transforms, number of test views).
    Table3,
    /// Figure 7: AUROC against the number of training images, mean over random subsets.
    Fewshot,
    /// Section 4.5: one flow (12 coupling blocks) over several categories at once.
    Multimodal,
}

/// MVTec AD categories in the column order of the paper's table 1, with its AUROCs in %:
/// (folder, OCSVM, 1-NN, DifferNet, DifferNet 16 shots).
pub const TABLE1: [(&str, f64, f64, f64, f64); 15] = [
    ("grid", 41.0, 55.7, 84.0, 65.8),
    ("leather", 88.0, 90.3, 97.1, 92.9),
    ("tile", 87.6, 96.9, 99.4, 98.9),
    ("carpet", 62.7, 81.1, 92.9, 77.0),
    ("wood", 95.3, 93.4, 99.8, 99.2),
    ("bottle", 99.0, 98.7, 99.0, 98.5),
    ("capsule", 54.4, 71.1, 86.9, 61.4),
    ("pill", 72.9, 83.7, 88.8, 65.1),
    ("transistor", 56.7, 75.6, 91.1, 76.6),
    ("zipper", 51.7, 88.6, 95.1, 88.3),
    ("cable", 80.3, 88.5, 95.9, 86.4),
    ("hazelnut", 91.1, 97.9, 99.3, 97.3),
    ("metal_nut", 61.1, 76.7, 96.1, 77.7),
    ("screw", 74.7, 67.0, 96.3, 75.9),
    ("toothbrush", 61.9, 91.9, 98.6, 92.3),
];

/// Table 2 (Magnetic Tile Defects), AUROC in %.
pub const TABLE2: [(&str, f64); 3] = [("OCSVM", 58.7), ("1-NN", 80.0), ("DifferNet", 97.7)];

/// Table 3 (mean over MVTec AD): (config, multi-scale, training transforms, test views, AUROC %).
pub const TABLE3: [(&str, bool, bool, usize, f64); 7] = [
    ("A", false, false, 1, 84.4),
    ("B", false, true, 64, 90.2),
    ("C", true, false, 1, 86.6),
    ("D", true, true, 1, 86.5),
    ("E", true, true, 4, 91.6),
    ("F", true, true, 16, 94.1),
    ("G", true, true, 64, 94.9),
];

/// Section 4.5: mean AUROC of one 12-block flow over all 15 MVTec AD categories.
pub const MULTIMODAL_PAPER: f64 = 90.2;

/// One cell of a result table.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Row {
    pub name: String,
    /// Our AUROC in %.
    pub ours: Option<f64>,
    /// The paper's AUROC in %.
    pub paper: Option<f64>,
    /// Where the paper's number is from.
    pub paper_ref: String,
    pub seconds: f64,
    pub note: String,
}

/// A finished experiment.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Table {
    pub experiment: ExperimentKind,
    pub data: String,
    pub rows: Vec<Row>,
    pub settings: serde_json::Value,
}

impl Table {
    pub fn markdown(&self) -> String {
        let f = |v: Option<f64>| v.map(|v| format!("{v:.1}")).unwrap_or_else(|| "-".into());
        let mut s = format!("# {:?} on `{}`\n\nAUROC in %.\n\n| | ours | paper | difference | paper source | time (s) | note |\n|---|---|---|---|---|---|---|\n", self.experiment, self.data);
        for r in &self.rows {
            let diff = match (r.ours, r.paper) {
                (Some(o), Some(p)) => format!("{:+.1}", o - p),
                _ => "-".into(),
            };
            s += &format!("| {} | {} | {} | {} | {} | {:.0} | {} |\n", r.name, f(r.ours), f(r.paper), diff, r.paper_ref, r.seconds, r.note);
        }
        s += &format!("\nSettings: `{}`\n", self.settings);
        s
    }
}

/// Settings shared by all experiments.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ExperimentConfig {
    /// Schedule, flow and training transforms of every flow trained.
    pub train: TrainConfig,
    /// Test views (rotations i·360/n); ablations use subsets of them.
    pub test_views: usize,
    /// Training-set sizes for `fewshot`.
    pub shots: Vec<usize>,
    /// Random subsets per size for `fewshot` (paper: 3).
    pub subsets: usize,
    /// Coupling blocks of the multimodal flow (paper: 12).
    pub multimodal_blocks: usize,
}

/// Features of one category: per training image its cached views, per test image its test views.
struct Category {
    name: String,
    train: Vec<Vec<f32>>,
    test: Vec<Vec<f32>>,
    is_defect: Vec<bool>,
}

/// Runs experiments with a feature extractor and cache; finished cells are kept in `out/cells`.
pub struct Runner<'a> {
    pub ex: &'a Extractor,
    pub cache: &'a FeatureCache,
    pub config: ExperimentConfig,
    pub out: PathBuf,
    pub bar: &'a dyn Progress,
}

/// Every `total/n`-th view of each image: the views of `test_views(n)` within `test_views(total)`.
fn subset_views(images: &[Vec<f32>], dim: usize, total: usize, n: usize) -> Vec<Vec<f32>> {
    let stride = total / n;
    images.iter().map(|f| (0..n).flat_map(|i| f[i * stride * dim..(i * stride + 1) * dim].to_vec()).collect()).collect()
}

/// The features of the first (full-resolution) scale only.
fn first_scale(images: &[Vec<f32>], dim: usize) -> Vec<Vec<f32>> {
    let d = dim / crate::backbone::N_SCALES;
    images.iter().map(|f| f.chunks(dim).flat_map(|row| row[..d].to_vec()).collect()).collect()
}

fn slug(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).collect()
}

impl Runner<'_> {
    fn dim(&self) -> usize {
        self.ex.feature_dim()
    }

    /// A cell computed once: its result is stored in `out/cells/<name>.json` and reused on resume.
    fn cell(&self, name: &str, paper: Option<f64>, paper_ref: &str, compute: impl FnOnce() -> Result<(f64, String)>) -> Result<Row> {
        let path = self.out.join("cells").join(format!("{}.json", slug(name)));
        if let Ok(text) = std::fs::read_to_string(&path) {
            if let Ok(row) = serde_json::from_str::<Row>(&text) {
                tracing::info!(cell = name, "already done, reusing");
                return Ok(row);
            }
        }
        let t = std::time::Instant::now();
        let (auroc, note) = compute()?;
        let row = Row {
            name: name.into(),
            ours: Some(100.0 * auroc),
            paper,
            paper_ref: paper_ref.into(),
            seconds: t.elapsed().as_secs_f64(),
            note,
        };
        write_atomic(&path, serde_json::to_string_pretty(&row).expect("serializable").as_bytes())?;
        tracing::info!(cell = name, auroc = row.ours, "done");
        Ok(row)
    }

    fn load(&self, root: &Path, train: &TrainConfig) -> Result<Category> {
        let ds = Dataset::open(root)?;
        ds.require_train()?;
        ds.require_test()?;
        self.bar.set_message(&format!("features of {}", root.display()));
        let train_feats = training_features(&ds.train, train, self.ex, self.cache, self.bar)?;
        let views = test_views(self.config.test_views);
        self.bar.set_length(ds.test.len() as u64);
        let mut test = vec![];
        for s in &ds.test {
            test.push(self.cache.features(self.ex, &s.path, &views)?);
            self.bar.inc(1);
        }
        let name = root.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| root.display().to_string());
        Ok(Category { name, train: train_feats, test, is_defect: ds.test.iter().map(|s| s.is_defect()).collect() })
    }

    /// Trains a flow on `train` and returns the image AUROC of `test` (mean z² over its views).
    fn differnet(&self, train: &[Vec<f32>], test: &[Vec<f32>], labels: &[bool], cfg: &TrainConfig) -> Result<f64> {
        let (flow, _) = train_flow(train, cfg, &self.ex.device, self.bar)?;
        flow_auroc(&flow, test, labels, &self.ex.device)
    }

    fn baseline(&self, kind: Baseline, c: &Category, dim: usize) -> Result<f64> {
        let train: Vec<f32> = c.train.concat();
        let views = self.config.test_views;
        let s = baselines::image_scores(kind, &train, &c.test.concat(), dim, views)?;
        auroc(&s, &c.is_defect)
            .ok_or_else(|| Error::Dataset { path: c.name.clone().into(), reason: "needs good and defective test images".into() })
    }

    /// Table 2 layout on one dataset; `model`, when given, is the trained DifferNet row.
    pub fn table2(&self, root: &Path, model: Option<&crate::model::Model>) -> Result<Vec<Row>> {
        let c = self.load(root, &self.config.train)?;
        let dim = self.dim();
        let mut rows = vec![
            self.cell(&format!("{} OCSVM", c.name), Some(TABLE2[0].1), "table 2", || {
                Ok((self.baseline(Baseline::OneClassSvm, &c, dim)?, "PCA 64 + z-score, RBF γ=1/64, ν=0.5".into()))
            })?,
            self.cell(&format!("{} 1-NN", c.name), Some(TABLE2[1].1), "table 2", || {
                Ok((self.baseline(Baseline::NearestNeighbour, &c, dim)?, "PCA 64 + z-score".into()))
            })?,
        ];
        rows.push(self.cell(&format!("{} DifferNet", c.name), Some(TABLE2[2].1), "table 2", || match model {
            Some(m) => Ok((flow_auroc(&m.flow, &c.test, &c.is_defect, &self.ex.device)?, given(m))),
            None => {
                Ok((self.differnet(&c.train, &c.test, &c.is_defect, &self.config.train)?, format!("{} epochs", self.config.train.epochs)))
            }
        })?);
        Ok(rows)
    }

    /// Table 1 layout over the MVTec AD categories found under `root`.
    pub fn table1(&self, root: &Path, categories: &[String]) -> Result<Vec<Row>> {
        let mut rows = vec![];
        for (name, ocsvm, nn, ours, shots16) in TABLE1 {
            if !categories.is_empty() && !categories.iter().any(|c| c == name) {
                continue;
            }
            let dir = root.join(name);
            if !dir.is_dir() {
                tracing::warn!(category = name, "not found under {}, skipped", root.display());
                continue;
            }
            let c = self.load(&dir, &self.config.train)?;
            let dim = self.dim();
            rows.push(self.cell(&format!("{name} OCSVM"), Some(ocsvm), "table 1", || {
                Ok((self.baseline(Baseline::OneClassSvm, &c, dim)?, String::new()))
            })?);
            rows.push(self.cell(&format!("{name} 1-NN"), Some(nn), "table 1", || {
                Ok((self.baseline(Baseline::NearestNeighbour, &c, dim)?, String::new()))
            })?);
            rows.push(self.cell(&format!("{name} DifferNet"), Some(ours), "table 1", || {
                Ok((self.differnet(&c.train, &c.test, &c.is_defect, &self.config.train)?, String::new()))
            })?);
            rows.push(
                self.cell(&format!("{name} DifferNet 16 shots"), Some(shots16), "table 1", || {
                    self.fewshot_mean(&c, 16, &self.config.train)
                })?,
            );
        }
        Ok(rows)
    }

    /// Table 3 (ablation): 4 flows (multi-scale × training transforms), scored with 1-64 test views.
    pub fn table3(&self, root: &Path, model: Option<&crate::model::Model>) -> Result<Vec<Row>> {
        let full = &self.config.train;
        let mut plain = full.clone();
        plain.augment = Augment { rotate: false, brightness: 0.0, contrast: 0.0, saturation: 0.0 };
        plain.cached_views = 1;
        plain.views_per_image = 1;
        let with_transforms = self.load(root, full)?;
        let ds = Dataset::open(root)?;
        let without = Category {
            name: with_transforms.name.clone(),
            train: training_features(&ds.train, &plain, self.ex, self.cache, self.bar)?,
            test: with_transforms.test.clone(),
            is_defect: with_transforms.is_defect.clone(),
        };
        let (dim, total) = (self.dim(), self.config.test_views);
        let mut rows = vec![];
        for (name, multi_scale, transforms, views, paper) in TABLE3 {
            let label = format!(
                "{} {name}: multi-scale {}, train transforms {}, {views} test views",
                with_transforms.name,
                yes(multi_scale),
                yes(transforms)
            );
            if views > total || total % views != 0 {
                rows.push(Row {
                    name: label,
                    ours: None,
                    paper: Some(paper),
                    paper_ref: "table 3 (MVTec AD mean)".into(),
                    seconds: 0.0,
                    note: format!("needs --test-views {views} (a multiple of {views})"),
                });
                continue;
            }
            let c = if transforms { &with_transforms } else { &without };
            let mut cfg = if transforms { full.clone() } else { plain.clone() };
            let (train, test, d) = if multi_scale {
                (c.train.clone(), subset_views(&c.test, dim, total, views), dim)
            } else {
                (first_scale(&c.train, dim), first_scale(&subset_views(&c.test, dim, total, views), dim), dim / crate::backbone::N_SCALES)
            };
            cfg.flow = crate::flow::FlowConfig { dim: d, ..full.flow.clone() };
            rows.push(self.cell(&label, Some(paper), "table 3 (MVTec AD mean)", || match model {
                Some(m) if multi_scale && transforms => Ok((flow_auroc(&m.flow, &test, &c.is_defect, &self.ex.device)?, given(m))),
                _ => Ok((self.differnet(&train, &test, &c.is_defect, &cfg)?, format!("{} epochs", cfg.epochs))),
            })?);
        }
        Ok(rows)
    }

    /// Mean AUROC of flows trained on `n` random training images, over `subsets` seeded subsets.
    fn fewshot_mean(&self, c: &Category, n: usize, cfg: &TrainConfig) -> Result<(f64, String)> {
        let n = n.min(c.train.len());
        let mut aurocs = vec![];
        for s in 0..self.config.subsets {
            let mut idx: Vec<usize> = (0..c.train.len()).collect();
            idx.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(cfg.seed + s as u64));
            let train: Vec<Vec<f32>> = idx[..n].iter().map(|&i| c.train[i].clone()).collect();
            let mut cfg = cfg.clone();
            cfg.seed += s as u64;
            aurocs.push(self.differnet(&train, &c.test, &c.is_defect, &cfg)?);
        }
        let mean = aurocs.iter().sum::<f64>() / aurocs.len() as f64;
        Ok((mean, format!("subsets: {}", aurocs.iter().map(|a| format!("{:.1}", 100.0 * a)).collect::<Vec<_>>().join(", "))))
    }

    /// AUROC against the number of training images (paper fig. 7; values only drawn there).
    pub fn fewshot(&self, root: &Path) -> Result<Vec<Row>> {
        let c = self.load(root, &self.config.train)?;
        let mut rows = vec![];
        for &n in &self.config.shots {
            let paper = if n == 16 { TABLE1.iter().find(|t| t.0 == c.name).map(|t| t.4) } else { None };
            let reference = if paper.is_some() { "table 1 (16 shots)" } else { "fig. 7 (plot only)" };
            rows.push(
                self.cell(&format!("{} {n} training images", c.name), paper, reference, || self.fewshot_mean(&c, n, &self.config.train))?,
            );
        }
        Ok(rows)
    }

    /// One flow with `multimodal_blocks` blocks over all `roots`; AUROC per category and the mean.
    pub fn multimodal(&self, roots: &[PathBuf]) -> Result<Vec<Row>> {
        let cats: Vec<Category> = roots.iter().map(|r| self.load(r, &self.config.train)).collect::<Result<_>>()?;
        let names: Vec<&str> = cats.iter().map(|c| c.name.as_str()).collect();
        let key = format!("multimodal {}", names.join("+"));
        let path = self.out.join("cells").join(format!("{}.json", slug(&key)));
        if let Some(rows) = std::fs::read_to_string(&path).ok().and_then(|t| serde_json::from_str::<Vec<Row>>(&t).ok()) {
            return Ok(rows);
        }
        let t = std::time::Instant::now();
        let mut cfg = self.config.train.clone();
        cfg.flow.blocks = self.config.multimodal_blocks;
        let train: Vec<Vec<f32>> = cats.iter().flat_map(|c| c.train.iter().cloned()).collect();
        let (flow, _) = train_flow(&train, &cfg, &self.ex.device, self.bar)?;
        let mut rows = vec![];
        let mut sum = 0.0;
        for c in &cats {
            let a = flow_auroc(&flow, &c.test, &c.is_defect, &self.ex.device)?;
            sum += a;
            rows.push(Row {
                name: format!("{} (one flow for all)", c.name),
                ours: Some(100.0 * a),
                paper: None,
                paper_ref: String::new(),
                seconds: 0.0,
                note: String::new(),
            });
        }
        let note = format!("{} categories, {} blocks, {} epochs", cats.len(), cfg.flow.blocks, cfg.epochs);
        rows.push(Row {
            name: "mean".into(),
            ours: Some(100.0 * sum / cats.len() as f64),
            paper: Some(MULTIMODAL_PAPER),
            paper_ref: "section 4.5 (all 15 MVTec AD categories)".into(),
            seconds: t.elapsed().as_secs_f64(),
            note,
        });
        write_atomic(&path, serde_json::to_string_pretty(&rows).expect("serializable").as_bytes())?;
        Ok(rows)
    }
}

fn given(m: &crate::model::Model) -> String {
    format!("given model: {} epochs, {} cached views", m.manifest.train.epochs, m.manifest.train.cached_views)
}

fn yes(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

/// Image AUROC of a flow on per-image view features (score: mean z² over views).
pub fn flow_auroc(flow: &NormalizingFlow, test: &[Vec<f32>], labels: &[bool], device: &candle_core::Device) -> Result<f64> {
    let dim = flow.config.dim;
    let all: Vec<f32> = test.concat();
    let s = crate::score::view_scores(flow, &all, dim, ScoreKind::MeanZ2, device)?;
    let views = test.first().map(|f| f.len() / dim).unwrap_or(1).max(1);
    let scores = crate::score::mean_per_image(&s, views);
    auroc(&scores, labels).ok_or_else(|| Error::Config("AUROC needs good and defective test images".into()))
}

/// Writes `table.json` and `table.md` (and `fewshot.png` for few-shot runs) into `out`.
pub fn write_table(out: &Path, table: &Table) -> Result<()> {
    write_atomic(&out.join("table.json"), serde_json::to_string_pretty(table).expect("serializable").as_bytes())?;
    write_atomic(&out.join("table.md"), table.markdown().as_bytes())?;
    if table.experiment == ExperimentKind::Fewshot {
        let points: Vec<(f64, f64)> =
            table.rows.iter().filter_map(|r| Some((r.name.rsplit(' ').nth(2)?.parse::<f64>().ok()?, r.ours?))).collect();
        let plot = crate::report::Plot::Lines {
            title: format!("AUROC against training set size ({})", table.data),
            x_label: "training images".into(),
            y_label: "image AUROC [%]".into(),
            series: vec![("DifferNet (ours)".into(), points)],
        };
        write_atomic(&out.join("fewshot.png"), &plot.png(640, 420)?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn view_subsets_and_first_scale_pick_the_right_columns() {
        // 2 images, 4 views of dim 6 (3 scales of 2): value = image·100 + view·10 + column
        let f: Vec<Vec<f32>> = (0..2).map(|i| (0..4).flat_map(|v| (0..6).map(move |c| (i * 100 + v * 10 + c) as f32)).collect()).collect();
        let s = subset_views(&f, 6, 4, 2);
        assert_eq!(s[1], vec![100., 101., 102., 103., 104., 105., 120., 121., 122., 123., 124., 125.]);
        assert_eq!(subset_views(&f, 6, 4, 1)[0], vec![0., 1., 2., 3., 4., 5.]);
        assert_eq!(first_scale(&f, 6)[0], vec![0., 1., 10., 11., 20., 21., 30., 31.]);
        // the rotations of test_views(n) are those at stride total/n in test_views(total)
        let (all, sub) = (test_views(16), test_views(4));
        for (i, v) in sub.iter().enumerate() {
            assert_eq!(v, &all[i * 4]);
        }
    }
}
