//! DifferNet (Rudolph, Wandt, Rosenhahn, WACV 2021): defect detection trained on defect-free
//! images only, with a normalizing flow on multi-scale features of a frozen ImageNet CNN.
//!
//! Data flow: image → views ([`transforms`]) → multi-scale features ([`backbone`]) →
//! latent z ([`flow`]) → anomaly score ([`score`]). See `docs/ARCHITECTURE.md`.

pub mod backbone;
pub mod error;
pub mod flow;
pub mod ops;
pub mod optim;
pub mod torch_file;
pub mod transforms;

pub use error::{Error, Result};
