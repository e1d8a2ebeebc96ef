//! `differnet synth` and `validation-set`: datasets the tool makes itself.

use super::{print_json, Cli};
use anyhow::Result;
use clap::Args;
use differnet::data::Dataset;
use std::path::PathBuf;

#[derive(Args)]
pub struct SynthArgs {
    #[arg(value_enum)]
    pub kind: SynthKind,
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 120)]
    pub train: usize,
    #[arg(long, default_value_t = 40)]
    pub test_good: usize,
    /// Test images of each defect type.
    #[arg(long, default_value_t = 20)]
    pub per_defect: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// `parts` only: parts turned by at most 5° (a fixture) instead of any orientation.
    #[arg(long)]
    pub fixed_pose: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SynthKind {
    Textures,
    Parts,
}

#[derive(Args)]
pub struct ValidationSetArgs {
    /// Dataset root (MVTec AD layout); only train/good is read.
    #[arg(long)]
    pub data: PathBuf,
    /// Folder to write the validation dataset to.
    #[arg(long)]
    pub out: PathBuf,
    /// Share of train/good held out.
    #[arg(long, default_value_t = 0.2)]
    pub holdout: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn synth(cli: &Cli, a: &SynthArgs) -> Result<()> {
    match a.kind {
        SynthKind::Textures => differnet::data::synth::generate(&a.out, a.train, a.test_good, a.per_defect, a.seed)?,
        SynthKind::Parts => differnet::data::synth::generate_parts(&a.out, a.train, a.test_good, a.per_defect, a.seed, a.fixed_pose)?,
    }
    if !cli.quiet {
        println!("synthetic dataset written to {}", a.out.display());
    }
    Ok(())
}

pub fn validation_set(cli: &Cli, a: &ValidationSetArgs) -> Result<()> {
    let v = differnet::data::validation::write_validation_set(&Dataset::open(&a.data)?, &a.out, a.holdout, a.seed)?;
    if cli.json {
        print_json(&v);
    } else if !cli.quiet {
        println!(
            "{}: {} images to fit, {} held out good, {} with synthetic defects",
            v.root.display(),
            v.fit_images,
            v.held_out_images,
            v.synthetic_defects
        );
    }
    Ok(())
}
