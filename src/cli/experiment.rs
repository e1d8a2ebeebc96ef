//! `differnet experiment`: the paper's tables on cached features (library: `experiment::Runner`).

use super::{print_json, BackboneArgs, Bar, Cli, JitterArgs, Switch};
use anyhow::{bail, Context, Result};
use clap::Args;
use differnet::experiments::{write_table, ExperimentConfig, ExperimentKind, Runner, Table};
use differnet::features::Extractor;
use differnet::flow::train::TrainConfig;
use differnet::pipeline::{installed_weights, Detector};
use std::path::PathBuf;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ExperimentArg {
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

impl ExperimentArg {
    fn kind(self) -> ExperimentKind {
        match self {
            ExperimentArg::Table1 => ExperimentKind::Table1,
            ExperimentArg::Table2 => ExperimentKind::Table2,
            ExperimentArg::Table3 => ExperimentKind::Table3,
            ExperimentArg::Fewshot => ExperimentKind::Fewshot,
            ExperimentArg::Multimodal => ExperimentKind::Multimodal,
        }
    }
    fn name(self) -> &'static str {
        match self {
            ExperimentArg::Table1 => "table1",
            ExperimentArg::Table2 => "table2",
            ExperimentArg::Table3 => "table3",
            ExperimentArg::Fewshot => "fewshot",
            ExperimentArg::Multimodal => "multimodal",
        }
    }
}

#[derive(Args)]
pub struct ExperimentArgs {
    #[arg(value_enum)]
    pub experiment: ExperimentArg,
    /// Dataset root (MVTec layout); for table1 and multimodal, a folder of category folders.
    #[arg(long)]
    pub data: PathBuf,
    /// Categories (folder names under --data) for table1 and multimodal (default: all found).
    #[arg(long, value_delimiter = ',')]
    pub categories: Vec<String>,
    /// Folder for table.md, table.json, figures and finished cells (kept for resuming).
    #[arg(long)]
    pub out: PathBuf,
    /// Training epochs of every flow (paper: 192).
    #[arg(long, default_value_t = 192)]
    pub epochs: usize,
    /// Random training views extracted per image (each epoch samples --views of them).
    #[arg(long, default_value_t = 16)]
    pub cached_views: usize,
    /// Training views sampled per image and epoch (paper: 4).
    #[arg(long, default_value_t = 4)]
    pub views: usize,
    /// Random rotations of the training views (paper: on; `train`'s fast schedule: off).
    #[arg(long, value_enum, default_value = "on")]
    pub rotate: Switch,
    /// Test views (paper: 64); table 3 uses subsets of 1, 4, 16 and 64 of them.
    #[arg(long, default_value_t = 64)]
    pub test_views: usize,
    #[command(flatten)]
    pub jitter: JitterArgs,
    /// Training-set sizes for fewshot.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 16, 64, 128, 256])]
    pub shots: Vec<usize>,
    /// Random subsets averaged per size (paper: 3).
    #[arg(long, default_value_t = 3)]
    pub subsets: usize,
    /// Hidden width of the flows' subnets (paper: 2048).
    #[arg(long, default_value_t = 2048)]
    pub hidden: usize,
    /// Adam's β₁,β₂ of every flow (default: the paper's "author-suggested" 0.9,0.999; the
    /// official code uses 0.8,0.8).
    #[arg(long, value_name = "B1,B2", value_delimiter = ',', num_args = 2, default_values_t = [0.9, 0.999])]
    pub adam_betas: Vec<f64>,
    /// An already trained model to use as the full DifferNet configuration (table2, table3).
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub backbone: BackboneArgs,
}

pub fn run(cli: &Cli, a: &ExperimentArgs, dev: &candle_core::Device) -> Result<()> {
    // a given model fixes the backbone and its stages for every cell
    let opts = a.backbone.open_options(dev)?;
    let (given, ex) = match &a.model {
        Some(p) => {
            let d = Detector::open(p, &opts)?;
            (Some(d.model), d.extractor)
        }
        None => {
            let kind = a.backbone.backbone_kind()?;
            let mut ex = Extractor::load(kind, &installed_weights(kind)?, dev)?;
            if let Some(stages) = &a.backbone.stages {
                ex = ex.with_stages(stages)?;
            }
            if let Some(n) = a.backbone.input_norm {
                ex = ex.with_normalization(n.into());
            }
            ex.batch = a.backbone.backbone_batch.max(1);
            (None, ex)
        }
    };
    let mut train = TrainConfig::new(ex.kind());
    train.set_stages(ex.stages())?;
    train.epochs = a.epochs;
    train.flow.hidden = a.hidden;
    train.cached_views = a.cached_views;
    train.views_per_image = a.views;
    train.augment = a.jitter.augment(a.rotate == Switch::On);
    train.seed = a.seed;
    (train.adam.beta1, train.adam.beta2) = (a.adam_betas[0], a.adam_betas[1]);
    train.validate()?;
    let config =
        ExperimentConfig { train, test_views: a.test_views, shots: a.shots.clone(), subsets: a.subsets.max(1), multimodal_blocks: 12 };
    let settings = serde_json::to_value(&config)?;
    let bar = Bar::new(cli, a.experiment.name());
    let runner = Runner { ex: &ex, cache: &opts.cache, config, out: a.out.clone(), bar: &bar };
    let roots = || -> Result<Vec<PathBuf>> {
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(&a.data)
            .with_context(|| format!("reading {}", a.data.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.join("train").is_dir() && (a.categories.is_empty() || a.categories.iter().any(|c| p.ends_with(c))))
            .collect();
        dirs.sort();
        if dirs.is_empty() {
            bail!("{}: no category folders (with train/good inside) found", a.data.display());
        }
        Ok(dirs)
    };
    let rows = match a.experiment.kind() {
        ExperimentKind::Table1 => runner.table1(&a.data, &a.categories)?,
        ExperimentKind::Table2 => runner.table2(&a.data, given.as_ref())?,
        ExperimentKind::Table3 => runner.table3(&a.data, given.as_ref())?,
        ExperimentKind::Fewshot => runner.fewshot(&a.data)?,
        ExperimentKind::Multimodal => runner.multimodal(&roots()?)?,
    };
    bar.0.finish_and_clear();
    let table = Table { experiment: a.experiment.kind(), data: a.data.display().to_string(), rows, settings };
    write_table(&a.out, &table)?;
    if cli.json {
        print_json(&table)
    } else {
        print!("{}", table.markdown())
    }
    Ok(())
}
