//! Pixel-level metrics of anomaly maps against ground-truth masks: pooled pixel AUROC and
//! AUPRO, overall and per defect type.

use crate::localize::MapKind;

/// Pixel AUROC and AUPRO (FPR ≤ 0.3) of anomaly maps against the ground-truth masks.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct PixelMetrics {
    /// The kind of map measured.
    #[serde(default)]
    pub map: MapKind,
    pub pixel_auroc: f64,
    pub aupro: f64,
    /// Per defect type (its images plus all good images): (pixel AUROC, AUPRO).
    pub per_defect: std::collections::BTreeMap<String, (f64, f64)>,
    /// Views averaged per gradient map.
    pub views: usize,
}

impl PixelMetrics {
    /// From (defect type, map at mask resolution, mask, width) per test image.
    pub fn compute(map: MapKind, items: &[(String, Vec<f32>, Vec<bool>, usize)], views: usize) -> Self {
        use crate::eval::metrics::{aupro, pixel_auroc, PixelSample};
        fn sample(i: &(String, Vec<f32>, Vec<bool>, usize)) -> PixelSample<'_> {
            PixelSample { map: &i.1, mask: &i.2, width: i.3 }
        }
        let all: Vec<PixelSample> = items.iter().map(sample).collect();
        let mut per_defect = std::collections::BTreeMap::new();
        let types: std::collections::BTreeSet<&str> = items.iter().map(|i| i.0.as_str()).filter(|t| *t != "good").collect();
        for t in types {
            let subset: Vec<PixelSample> = items.iter().filter(|i| i.0 == "good" || i.0 == t).map(sample).collect();
            per_defect.insert(t.to_string(), (pixel_auroc(&subset).unwrap_or(f64::NAN), aupro(&subset)));
        }
        PixelMetrics { map, pixel_auroc: pixel_auroc(&all).unwrap_or(f64::NAN), aupro: aupro(&all), per_defect, views }
    }
}
