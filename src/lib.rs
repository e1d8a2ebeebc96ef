//! DifferNet (Rudolph, Wandt, Rosenhahn, WACV 2021): defect detection trained on defect-free
//! images only, with a normalizing flow on multi-scale features of a frozen ImageNet CNN.
//!
//! Data flow: image → views ([`transforms`]) → multi-scale features ([`backbone`],
//! [`features`]) → latent z ([`flow`]) → anomaly score ([`score`]). See `docs/ARCHITECTURE.md`.

pub mod backbone;
pub mod baselines;
pub mod bench;
pub mod data;
pub mod error;
pub mod experiment;
pub mod features;
pub mod fuzzing;
pub mod localize;
pub mod flow;
pub mod flow_grad;
pub mod metrics;
pub mod model;
pub mod ops;
pub mod optim;
pub mod report;
pub mod score;
pub mod serve;
pub mod sgemm;
pub mod synth;
pub mod torch_file;
pub mod train;
pub mod transforms;
pub mod weights;
pub mod winograd;

pub use error::{Error, Result};
