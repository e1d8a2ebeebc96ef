//! Detection metrics: image-level AUROC with ties counted half (the Mann-Whitney statistic),
//! ROC curve points, and threshold choice (target false-positive rate, best F1).

/// Area under the ROC curve: P(score_defect > score_good) + ½·P(equal). `None` if a class is empty.
pub fn auroc(scores: &[f64], is_defect: &[bool]) -> Option<f64> {
    assert_eq!(scores.len(), is_defect.len());
    let n_pos = is_defect.iter().filter(|&&d| d).count();
    let n_neg = is_defect.len() - n_pos;
    if n_pos == 0 || n_neg == 0 {
        return None;
    }
    // average ranks (1-based) over tied groups
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let mut rank_sum_pos = 0f64;
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && scores[order[j + 1]] == scores[order[i]] {
            j += 1;
        }
        let avg_rank = (i + j) as f64 / 2.0 + 1.0;
        rank_sum_pos += order[i..=j].iter().filter(|&&k| is_defect[k]).count() as f64 * avg_rank;
        i = j + 1;
    }
    let u = rank_sum_pos - (n_pos * (n_pos + 1)) as f64 / 2.0;
    Some(u / (n_pos as f64 * n_neg as f64))
}

/// ROC curve as (false-positive rate, true-positive rate) points from (0,0) to (1,1).
pub fn roc_curve(scores: &[f64], is_defect: &[bool]) -> Vec<(f64, f64)> {
    let n_pos = is_defect.iter().filter(|&&d| d).count().max(1) as f64;
    let n_neg = is_defect.iter().filter(|&&d| !d).count().max(1) as f64;
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let (mut tp, mut fp) = (0f64, 0f64);
    let mut pts = vec![(0.0, 0.0)];
    let mut i = 0;
    while i < order.len() {
        let s = scores[order[i]];
        while i < order.len() && scores[order[i]] == s {
            if is_defect[order[i]] { tp += 1.0 } else { fp += 1.0 }
            i += 1;
        }
        pts.push((fp / n_neg, tp / n_pos));
    }
    pts
}

/// Smallest threshold whose false-positive rate on `good_scores` is at most `fpr`
/// (a score ≥ threshold is an anomaly).
pub fn threshold_for_fpr(good_scores: &[f64], fpr: f64) -> Option<f64> {
    if good_scores.is_empty() {
        return None;
    }
    let mut s = good_scores.to_vec();
    s.sort_by(|a, b| b.total_cmp(a));
    let allowed = (fpr * s.len() as f64).floor() as usize;
    // with threshold just above s[allowed], exactly `allowed` good scores are flagged
    Some(if allowed >= s.len() { s[s.len() - 1] } else { next_up(s[allowed]) })
}

fn next_up(x: f64) -> f64 {
    if x.is_nan() || x == f64::INFINITY {
        return x;
    }
    let bits = x.to_bits();
    f64::from_bits(if x >= 0.0 { bits + 1 } else if x == 0.0 { 1 } else { bits - 1 })
}

/// Threshold maximising F1 of the defect class, with its F1.
pub fn best_f1_threshold(scores: &[f64], is_defect: &[bool]) -> Option<(f64, f64)> {
    let n_pos = is_defect.iter().filter(|&&d| d).count() as f64;
    if n_pos == 0.0 {
        return None;
    }
    let mut cands: Vec<f64> = scores.to_vec();
    cands.sort_by(|a, b| a.total_cmp(b));
    cands.dedup();
    let mut best: Option<(f64, f64)> = None;
    for t in cands {
        let tp = scores.iter().zip(is_defect).filter(|(s, d)| **d && **s >= t).count() as f64;
        let fp = scores.iter().zip(is_defect).filter(|(s, d)| !**d && **s >= t).count() as f64;
        let f1 = 2.0 * tp / (2.0 * tp + fp + (n_pos - tp));
        if best.map(|b| f1 > b.1).unwrap_or(true) {
            best = Some((t, f1));
        }
    }
    best
}

/// Counts at a threshold: (true positives, false positives, true negatives, false negatives).
pub fn confusion(scores: &[f64], is_defect: &[bool], threshold: f64) -> (usize, usize, usize, usize) {
    let mut c = (0, 0, 0, 0);
    for (s, d) in scores.iter().zip(is_defect) {
        match (*s >= threshold, *d) {
            (true, true) => c.0 += 1,
            (true, false) => c.1 += 1,
            (false, false) => c.2 += 1,
            (false, true) => c.3 += 1,
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auroc_known_values() {
        assert_eq!(auroc(&[0.1, 0.2, 0.8, 0.9], &[false, false, true, true]), Some(1.0));
        assert_eq!(auroc(&[0.9, 0.8, 0.2, 0.1], &[false, false, true, true]), Some(0.0));
        // one inversion of four pairs
        assert_eq!(auroc(&[0.1, 0.5, 0.4, 0.9], &[false, false, true, true]), Some(0.75));
        assert_eq!(auroc(&[1.0, 2.0], &[false, false]), None);
    }

    #[test]
    fn auroc_counts_ties_as_half() {
        // all equal: every pair is a tie -> 0.5
        assert_eq!(auroc(&[3.0; 5], &[false, true, false, true, true]), Some(0.5));
        // pos {2, 3}, neg {1, 2}: pairs (2>1)=1, (2=2)=.5, (3>1)=1, (3>2)=1 -> 3.5/4
        assert_eq!(auroc(&[2.0, 3.0, 1.0, 2.0], &[true, true, false, false]), Some(0.875));
        // brute force on a tie-heavy case
        let s = [1.0, 1.0, 2.0, 2.0, 2.0, 3.0, 1.0, 3.0];
        let d = [true, false, false, true, true, false, false, true];
        let mut u = 0.0;
        for i in 0..8 {
            for j in 0..8 {
                if d[i] && !d[j] {
                    u += if s[i] > s[j] { 1.0 } else if s[i] == s[j] { 0.5 } else { 0.0 };
                }
            }
        }
        assert!((auroc(&s, &d).unwrap() - u / 16.0).abs() < 1e-12);
    }

    #[test]
    fn roc_curve_ends_and_area() {
        let s = [0.1, 0.5, 0.4, 0.9];
        let d = [false, false, true, true];
        let pts = roc_curve(&s, &d);
        assert_eq!(pts.first(), Some(&(0.0, 0.0)));
        assert_eq!(pts.last(), Some(&(1.0, 1.0)));
        let area: f64 = pts.windows(2).map(|w| (w[1].0 - w[0].0) * (w[1].1 + w[0].1) / 2.0).sum();
        assert!((area - 0.75).abs() < 1e-12);
    }

    #[test]
    fn thresholds() {
        let good = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0];
        let t = threshold_for_fpr(&good, 0.1).unwrap();
        assert_eq!(good.iter().filter(|&&s| s >= t).count(), 1);
        let t = threshold_for_fpr(&good, 0.0).unwrap();
        assert_eq!(good.iter().filter(|&&s| s >= t).count(), 0);
        let (t, f1) = best_f1_threshold(&[0.1, 0.2, 0.7, 0.8], &[false, false, true, true]).unwrap();
        assert_eq!((t, f1), (0.7, 1.0));
        assert_eq!(confusion(&[0.1, 0.2, 0.7, 0.8], &[false, true, true, false], 0.5), (1, 1, 1, 1));
    }
}
