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
            if is_defect[order[i]] {
                tp += 1.0
            } else {
                fp += 1.0
            }
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

/// The standard normal quantile Φ⁻¹(p) for p in (0, 1) (Acklam's rational approximation,
/// relative error below 1.2e-9).
pub fn normal_quantile(p: f64) -> f64 {
    const A: [f64; 6] =
        [-3.969683028665376e1, 2.209460984245205e2, -2.759285104469687e2, 1.38357751867269e2, -3.066479806614716e1, 2.506628277459239];
    const B: [f64; 5] = [-5.447609879822406e1, 1.615858368580409e2, -1.556989798598866e2, 6.680131188771972e1, -1.328068155288572e1];
    const C: [f64; 6] =
        [-7.784894002430293e-3, -3.223964580411365e-1, -2.400758277161838, -2.549732539343734, 4.374664141464968, 2.938163982698783];
    const D: [f64; 4] = [7.784695709041462e-3, 3.224671290700398e-1, 2.445134137142996, 3.754408661907416];
    let p = p.clamp(1e-300, 1.0 - 1e-16);
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5]) / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    if p < 0.02425 {
        tail((-2.0 * p.ln()).sqrt())
    } else if p > 1.0 - 0.02425 {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    }
}

fn next_up(x: f64) -> f64 {
    if x.is_nan() || x == f64::INFINITY {
        return x;
    }
    let bits = x.to_bits();
    f64::from_bits(if x >= 0.0 {
        bits + 1
    } else if x == 0.0 {
        1
    } else {
        bits - 1
    })
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

/// One anomaly map with its ground-truth mask (row-major, same size).
pub struct PixelSample<'a> {
    pub map: &'a [f32],
    pub mask: &'a [bool],
    pub width: usize,
}

/// Pixel-level AUROC over all pixels of all images.
pub fn pixel_auroc(samples: &[PixelSample]) -> Option<f64> {
    let scores: Vec<f64> = samples.iter().flat_map(|s| s.map.iter().map(|&v| v as f64)).collect();
    let labels: Vec<bool> = samples.iter().flat_map(|s| s.mask.iter().copied()).collect();
    auroc(&scores, &labels)
}

/// 8-connected components of a mask: a component id per pixel (0 = background) and their count.
pub fn connected_components(mask: &[bool], width: usize) -> (Vec<u32>, usize) {
    let height = mask.len() / width.max(1);
    let mut label = vec![0u32; mask.len()];
    let mut n = 0;
    for start in 0..mask.len() {
        if !mask[start] || label[start] != 0 {
            continue;
        }
        n += 1;
        let mut stack = vec![start];
        label[start] = n as u32;
        while let Some(p) = stack.pop() {
            let (y, x) = ((p / width) as isize, (p % width) as isize);
            for dy in -1..=1 {
                for dx in -1..=1 {
                    let (yy, xx) = (y + dy, x + dx);
                    if yy < 0 || xx < 0 || yy >= height as isize || xx >= width as isize {
                        continue;
                    }
                    let q = yy as usize * width + xx as usize;
                    if mask[q] && label[q] == 0 {
                        label[q] = n as u32;
                        stack.push(q);
                    }
                }
            }
        }
    }
    (label, n)
}

/// Per-region-overlap curve (MVTec AD): for each threshold, (false-positive rate over all
/// defect-free pixels, mean over all ground-truth regions of the fraction of the region covered).
pub fn pro_curve(samples: &[PixelSample]) -> Vec<(f64, f64)> {
    // (score, region index or none) for every pixel
    let mut pixels: Vec<(f32, Option<usize>)> = vec![];
    let mut region_sizes: Vec<usize> = vec![];
    for s in samples {
        let (label, n) = connected_components(s.mask, s.width);
        let base = region_sizes.len();
        region_sizes.resize(base + n, 0);
        for (&v, &l) in s.map.iter().zip(&label) {
            if l > 0 {
                region_sizes[base + l as usize - 1] += 1;
                pixels.push((v, Some(base + l as usize - 1)));
            } else {
                pixels.push((v, None));
            }
        }
    }
    let negatives = pixels.iter().filter(|p| p.1.is_none()).count().max(1) as f64;
    let k = region_sizes.len().max(1) as f64;
    pixels.sort_by(|a, b| b.0.total_cmp(&a.0));
    let (mut fp, mut pro) = (0f64, 0f64);
    let mut curve = vec![(0.0, 0.0)];
    let mut i = 0;
    while i < pixels.len() {
        let t = pixels[i].0;
        while i < pixels.len() && pixels[i].0 == t {
            match pixels[i].1 {
                Some(r) => pro += 1.0 / (k * region_sizes[r] as f64),
                None => fp += 1.0,
            }
            i += 1;
        }
        curve.push((fp / negatives, pro));
    }
    curve
}

/// Area under a (fpr, y) curve from fpr 0 to `max_fpr` (trapezoids, interpolated at the end),
/// divided by `max_fpr`: AUPRO with `max_fpr` 0.3.
pub fn area_up_to(curve: &[(f64, f64)], max_fpr: f64) -> f64 {
    let mut area = 0.0;
    for w in curve.windows(2) {
        let ((x0, y0), (x1, y1)) = (w[0], w[1]);
        if x0 >= max_fpr {
            break;
        }
        if x1 <= max_fpr {
            area += (x1 - x0) * (y0 + y1) / 2.0;
        } else {
            let y = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0);
            area += (max_fpr - x0) * (y0 + y) / 2.0;
        }
    }
    area / max_fpr
}

/// AUPRO up to a false-positive rate of 0.3, normalized to [0, 1].
pub fn aupro(samples: &[PixelSample]) -> f64 {
    area_up_to(&pro_curve(samples), 0.3)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pixel_metrics_known_answers() {
        // 6x4 image, two regions: a 2x2 block (4 px) and a single pixel
        let w = 6;
        let mut mask = vec![false; 24];
        for p in [7, 8, 13, 14, 22] {
            mask[p] = true;
        }
        let (labels, n) = connected_components(&mask, w);
        assert_eq!(n, 2);
        assert_eq!(labels[7], labels[14]);
        assert_ne!(labels[7], labels[22]);
        // a perfect map
        let perfect: Vec<f32> = mask.iter().map(|&m| if m { 1.0 } else { 0.0 }).collect();
        let s = [PixelSample { map: &perfect, mask: &mask, width: w }];
        assert_eq!(pixel_auroc(&s), Some(1.0));
        assert!((aupro(&s) - 1.0).abs() < 1e-12);
        // a constant map: AUROC 1/2; PRO rises with FPR from (0,0) to (1,1): area to 0.3 is 0.045 -> 0.15
        let flat = vec![0.5f32; 24];
        let s = [PixelSample { map: &flat, mask: &mask, width: w }];
        assert_eq!(pixel_auroc(&s), Some(0.5));
        assert!((aupro(&s) - 0.15).abs() < 1e-12);
        // the map finds only the small region (score 1), then everything else at 0:
        // PRO 0.5 at FPR 0, then (1, 1): area = 0.3*0.5 + 0.3*0.3/2*0.5 -> /0.3 = 0.575
        let mut half = vec![0f32; 24];
        half[22] = 1.0;
        let s = [PixelSample { map: &half, mask: &mask, width: w }];
        assert!((aupro(&s) - 0.575).abs() < 1e-12, "{}", aupro(&s));
        // regions count equally whatever their size: covering the big one instead gives the same
        let mut big = vec![0f32; 24];
        for p in [7, 8, 13, 14] {
            big[p] = 1.0;
        }
        let s = [PixelSample { map: &big, mask: &mask, width: w }];
        assert!((aupro(&s) - 0.575).abs() < 1e-12);
    }

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
                    u += if s[i] > s[j] {
                        1.0
                    } else if s[i] == s[j] {
                        0.5
                    } else {
                        0.0
                    };
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
        // Φ⁻¹ at known points (tables: 0.99 → 2.326348, 0.975 → 1.959964, 0.5 → 0)
        assert!((normal_quantile(0.99) - 2.326348).abs() < 1e-6);
        assert!((normal_quantile(0.975) - 1.959964).abs() < 1e-6);
        assert!(normal_quantile(0.5).abs() < 1e-12 && (normal_quantile(0.01) + 2.326348).abs() < 1e-6);
        assert_eq!(good.iter().filter(|&&s| s >= t).count(), 0);
        let (t, f1) = best_f1_threshold(&[0.1, 0.2, 0.7, 0.8], &[false, false, true, true]).unwrap();
        assert_eq!((t, f1), (0.7, 1.0));
        assert_eq!(confusion(&[0.1, 0.2, 0.7, 0.8], &[false, true, true, false], 0.5), (1, 1, 1, 1));
    }
}
