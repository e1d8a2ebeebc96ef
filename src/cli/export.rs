//! `differnet export`: a model written for another runtime: the ONNX scoring graph with a Triton
//! model repository (`--format onnx`), or the model file with its flow stored in f16 (or f32).

use super::{print_json, Cli, FlowStorageArg};
use anyhow::{bail, Context, Result};
use clap::Args;
use differnet::model::Model;
use differnet::pipeline::{Detector, OpenOptions};
use std::path::PathBuf;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// A differnet model file (safetensors), its flow stored as `--flow-storage` says.
    Safetensors,
    /// `OUT/model.onnx` (opset 17: backbone, flow, scores, threshold) and a Triton model
    /// repository `OUT/triton/NAME/` (docs/deploy.md).
    Onnx,
}

#[derive(Args, Clone)]
pub struct ExportArgs {
    /// Model file to read.
    pub model: PathBuf,
    /// File to write (safetensors; never the input), or folder (onnx).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value = "safetensors")]
    pub format: ExportFormat,
    /// How the written model file stores the flow: `f16` halves it (scores within 1e-3
    /// relative; the threshold is kept as it is), `f32` widens an f16 model back (its rounded
    /// values stay). An ONNX graph stores the flow as the model file does (f16 weights are
    /// widened in the graph).
    #[arg(long, value_enum, default_value = "f16")]
    pub flow_storage: FlowStorageArg,
    /// The model's name in the Triton repository (default: the model file's stem).
    #[arg(long)]
    pub name: Option<String>,
}

pub fn run(cli: &Cli, a: &ExportArgs) -> Result<()> {
    match a.format {
        ExportFormat::Safetensors => model_file(cli, a),
        ExportFormat::Onnx => onnx(cli, a),
    }
}

fn onnx(cli: &Cli, a: &ExportArgs) -> Result<()> {
    let started = std::time::Instant::now();
    let det = Detector::open(&a.model, &OpenOptions { cache: differnet::features::FeatureCache { dir: None }, ..OpenOptions::default() })?;
    let name = match &a.name {
        Some(n) => n.clone(),
        None => a
            .model
            .file_stem()
            .map(|s| s.to_string_lossy().replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "_"))
            .unwrap_or("model".into()),
    };
    let out = differnet::export::write_onnx(&det, &a.out, &name)?;
    if cli.json {
        print_json(&serde_json::json!({
            "model": a.model, "format": "onnx", "onnx": out.onnx, "triton_config": out.triton_config, "bytes": out.bytes,
            "outputs": out.outputs, "metadata": out.metadata.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
            "seconds": started.elapsed().as_secs_f64(),
        }));
    } else if !cli.quiet {
        println!(
            "{} -> {} ({:.1} MB; outputs {}) and Triton repository {}",
            a.model.display(),
            out.onnx.display(),
            out.bytes as f64 / 1e6,
            out.outputs.join(", "),
            out.triton_config.parent().and_then(|p| p.parent()).unwrap_or(&a.out).display()
        );
    }
    Ok(())
}

fn model_file(cli: &Cli, a: &ExportArgs) -> Result<()> {
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
