//! Image-level evaluation of a model on a labelled test set: AUROC overall and per defect type,
//! confusion counts at the model's threshold, and recall at fixed false-positive rates.

use crate::score::ScoreKind;

/// Score of one test image.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct SampleScore {
    pub path: String,
    pub defect: String,
    pub score: f64,
    /// The maximum of the image's anomaly map, when maps were computed (`test --pixel-metrics`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub map_max: Option<f64>,
    /// The flow's score when the image score is another (the combined score).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flow_score: Option<f64>,
}

/// Recall of defective images at a threshold that flags at most `fpr` of the good ones.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct OperatingPoint {
    pub fpr: f64,
    pub threshold: f64,
    pub recall: f64,
}

/// The false-positive rates of [`Evaluation::operating_points`].
pub const OPERATING_FPRS: [f64; 3] = [0.0, 0.01, 0.05];

/// Operating points of scores at [`OPERATING_FPRS`] (empty without good or defective scores).
pub fn operating_points(scores: &[f64], is_defect: &[bool]) -> Vec<OperatingPoint> {
    let good: Vec<f64> = scores.iter().zip(is_defect).filter(|(_, d)| !**d).map(|(s, _)| *s).collect();
    let bad: Vec<f64> = scores.iter().zip(is_defect).filter(|(_, d)| **d).map(|(s, _)| *s).collect();
    if bad.is_empty() {
        return vec![];
    }
    OPERATING_FPRS
        .iter()
        .filter_map(|&fpr| {
            let threshold = crate::eval::metrics::threshold_for_fpr(&good, fpr)?;
            let recall = bad.iter().filter(|s| **s >= threshold).count() as f64 / bad.len() as f64;
            Some(OperatingPoint { fpr, threshold, recall })
        })
        .collect()
}

/// Image-level results on a labelled test set.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Evaluation {
    /// Backbone the model was trained with.
    pub backbone: String,
    pub image_auroc: f64,
    pub n_good: usize,
    pub n_defect: usize,
    /// AUROC of each defect type against all good images.
    pub per_defect_auroc: std::collections::BTreeMap<String, f64>,
    pub test_views: usize,
    pub score_kind: ScoreKind,
    pub threshold: Option<f64>,
    /// (true positives, false positives, true negatives, false negatives) at the threshold.
    pub confusion: Option<(usize, usize, usize, usize)>,
    /// Recall of defective images at false-positive rates 0, 1% and 5% of the good test images
    /// (the thresholds are chosen on this test set: operating points, not a calibration).
    #[serde(default)]
    pub operating_points: Vec<OperatingPoint>,
    /// Pixel-level localization metrics, when computed (`test --pixel-metrics`).
    pub pixel: Option<crate::eval::pixel_metrics::PixelMetrics>,
    /// Image AUROC of the anomaly maps' maxima, when maps were computed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub map_max_auroc: Option<f64>,
    /// Image AUROC of the flow's score alone (the paper's), when the model's image score
    /// combines it with the feature map's maximum.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flow_score_auroc: Option<f64>,
    pub samples: Vec<SampleScore>,
}

impl Evaluation {
    pub fn from_scores(
        backbone: &str,
        samples: Vec<SampleScore>,
        test_views: usize,
        score_kind: ScoreKind,
        threshold: Option<f64>,
    ) -> Self {
        use crate::eval::metrics::{auroc, confusion};
        let scores: Vec<f64> = samples.iter().map(|s| s.score).collect();
        let labels: Vec<bool> = samples.iter().map(|s| s.defect != "good").collect();
        let mut per_defect = std::collections::BTreeMap::new();
        let types: std::collections::BTreeSet<&str> = samples.iter().filter(|s| s.defect != "good").map(|s| s.defect.as_str()).collect();
        for t in types {
            let (s, l): (Vec<f64>, Vec<bool>) =
                samples.iter().filter(|x| x.defect == "good" || x.defect == t).map(|x| (x.score, x.defect != "good")).unzip();
            if let Some(a) = auroc(&s, &l) {
                per_defect.insert(t.to_string(), a);
            }
        }
        Evaluation {
            backbone: backbone.to_string(),
            image_auroc: auroc(&scores, &labels).unwrap_or(f64::NAN),
            n_good: labels.iter().filter(|d| !**d).count(),
            n_defect: labels.iter().filter(|d| **d).count(),
            per_defect_auroc: per_defect,
            test_views,
            score_kind,
            threshold,
            confusion: threshold.map(|t| confusion(&scores, &labels, t)),
            operating_points: operating_points(&scores, &labels),
            pixel: None,
            map_max_auroc: None,
            flow_score_auroc: None,
            samples,
        }
    }

    /// A human-readable table.
    pub fn table(&self) -> String {
        let mut s = format!("{:<16} {:>8} {:>8}\n", "defect type", "images", "AUROC");
        for (t, a) in &self.per_defect_auroc {
            let n = self.samples.iter().filter(|x| &x.defect == t).count();
            s += &format!("{:<16} {:>8} {:>8.4}\n", t, n, a);
        }
        s += &format!(
            "{:<16} {:>8} {:>8.4}   ({} good, {} test views, score {:?}, backbone {})\n",
            "ALL",
            self.n_good + self.n_defect,
            self.image_auroc,
            self.n_good,
            self.test_views,
            self.score_kind,
            self.backbone
        );
        if let Some(a) = self.flow_score_auroc {
            s += &format!("image score: the flow's and the feature map's maximum, standardized; the flow's score alone: AUROC {a:.4}\n");
        }
        if let Some(p) = &self.pixel {
            s += &format!("\n{:<16} {:>11} {:>8}   ({} maps, {} views)\n", "defect type", "pixel AUROC", "AUPRO", p.map.id(), p.views);
            for (t, (a, pro)) in &p.per_defect {
                s += &format!("{:<16} {:>11.4} {:>8.4}\n", t, a, pro);
            }
            s += &format!("{:<16} {:>11.4} {:>8.4}\n", "ALL", p.pixel_auroc, p.aupro);
            if let Some(a) = self.map_max_auroc {
                s += &format!("image AUROC of the maps' maxima {a:.4}\n");
            }
        }
        if let (Some(t), Some((tp, fp, tn, fn_))) = (self.threshold, self.confusion) {
            let fpr = fp as f64 / (fp + tn).max(1) as f64;
            let recall = tp as f64 / (tp + fn_).max(1) as f64;
            s += &format!("at the model's threshold {t:.5}: TP {tp}  FP {fp}  TN {tn}  FN {fn_}  (FPR {fpr:.3}, recall {recall:.3})\n");
        }
        if !self.operating_points.is_empty() {
            let points: Vec<String> = self.operating_points.iter().map(|p| format!("{:.3} at FPR {}%", p.recall, p.fpr * 100.0)).collect();
            s += &format!("recall {}\n", points.join(", "));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operating_points_count_recall_at_each_false_positive_rate() {
        // good scores 0..99; defects at 94.5, 98.5, 99.5 and 120: at FPR 0 only scores above 99
        // pass (2 of 4), at 1% (one good flagged) above 98 (3 of 4), at 5% above 94 (4 of 4)
        let mut scores: Vec<f64> = (0..100).map(f64::from).collect();
        let mut labels = vec![false; 100];
        scores.extend([94.5, 98.5, 99.5, 120.0]);
        labels.extend([true; 4]);
        let points = operating_points(&scores, &labels);
        let recalls: Vec<(f64, f64)> = points.iter().map(|p| (p.fpr, p.recall)).collect();
        assert_eq!(recalls, vec![(0.0, 0.5), (0.01, 0.75), (0.05, 1.0)]);
        for p in &points {
            let flagged = scores[..100].iter().filter(|s| **s >= p.threshold).count();
            assert_eq!(flagged, (p.fpr * 100.0).round() as usize, "FPR {} flags {flagged} good images", p.fpr);
        }
        assert!(operating_points(&scores[..100], &labels[..100]).is_empty(), "no defects, no operating points");
    }
}
