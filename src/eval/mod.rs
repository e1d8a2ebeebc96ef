//! Evaluation: detection metrics (AUROC, ROC, thresholds), test-set evaluation of a model and
//! the pixel metrics of its anomaly maps against ground-truth masks.

pub mod evaluation;
pub mod metrics;
pub mod pixel_metrics;
