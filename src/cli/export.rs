//! `differnet export`: a model written in another form; today a model file whose flow is stored
//! in f16 (or back in f32), with the same manifest, threshold and ranges.

use super::{print_json, Cli, FlowStorageArg};
use anyhow::{bail, Context, Result};
use clap::Args;
use differnet::model::Model;
use std::path::PathBuf;

#[derive(Args, Clone)]
pub struct ExportArgs {
    /// Model file to read.
    pub model: PathBuf,
    /// File to write (never the input).
    #[arg(long)]
    pub out: PathBuf,
    /// How the written file stores the flow: `f16` halves it (scores within 1e-3 relative; the
    /// threshold is kept as it is), `f32` widens an f16 model back (its rounded values stay).
    #[arg(long, value_enum, default_value = "f16")]
    pub flow_storage: FlowStorageArg,
}

pub fn run(cli: &Cli, a: &ExportArgs) -> Result<()> {
    if a.out.canonicalize().ok().is_some_and(|o| a.model.canonicalize().ok() == Some(o)) {
        bail!("--out {} is the model itself: write the export to another file", a.out.display());
    }
    let started = std::time::Instant::now();
    let mut model = Model::load(&a.model, &candle_core::Device::Cpu)?;
    let flow_bytes = |m: &Model| m.manifest.flow.parameter_count() * m.manifest.flow_storage.bytes_per_parameter();
    let flow_before = flow_bytes(&model);
    model.set_flow_storage(a.flow_storage.into())?;
    model.save(&a.out)?;
    let bytes = |p: &PathBuf| std::fs::metadata(p).map(|m| m.len()).with_context(|| format!("{}", p.display()));
    let (before, after) = (bytes(&a.model)?, bytes(&a.out)?);
    if cli.json {
        print_json(&serde_json::json!({
            "model": a.model, "out": a.out, "flow_storage": model.manifest.flow_storage,
            "bytes_in": before, "bytes_out": after,
            "flow_bytes_in": flow_before, "flow_bytes_out": flow_bytes(&model), "seconds": started.elapsed().as_secs_f64(),
        }));
    } else if !cli.quiet {
        println!(
            "{} ({:.1} MB) -> {} ({:.1} MB, flow stored as {:?})",
            a.model.display(),
            before as f64 / 1e6,
            a.out.display(),
            after as f64 / 1e6,
            model.manifest.flow_storage
        );
    }
    Ok(())
}
