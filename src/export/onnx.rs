//! The whole scoring pass of a model as one ONNX graph: network inputs → multi-scale pooled
//! backbone features → flow → per-view and per-image scores → `pred_score` / `pred_label`, plus,
//! for a combined-score model, the local-feature anomaly map and its maximum.

use super::graph::{Attr, Dim, GraphBuilder};
use crate::backbone::layers::{Activation, Layer};
use crate::backbone::{INPUT_SIZE, N_SCALES};
use crate::error::{Error, Result};
use crate::features::local_density::{LocalDensity, LocalGaussian, COARSE_TENSOR_PREFIX, TENSOR_PREFIX};
use crate::flow::{soft_clamp_factor, NormalizingFlow, Subnet};
use crate::localize::FEATURE_MAP_SIGMA;
use crate::model::{FlowStorage, ImageScore};
use crate::pipeline::Detector;
use crate::score::ScoreKind;
use onnx_protobuf::tensor_proto::DataType;
use onnx_protobuf::ModelProto;
use std::collections::HashMap;

/// The graph's outputs, in order, and when each is there.
pub const OUTPUTS: [(&str, &str); 7] = [
    ("score", "per image (each `tiles` × `test_views` consecutive rows of `input`): the model's anomaly score, FP32"),
    (
        "pred_score",
        "per image: the score normalized with the stored threshold and score range (0.5 at the threshold), in [0, 1]; models with both",
    ),
    ("pred_label", "per image: score >= threshold, BOOL; models with a threshold"),
    ("view_score", "per row of `input`: the flow's score of that view"),
    ("flow_score", "per image: the flow's score, the mean of each tile's views' (eq. 5), the largest over its tiles"),
    ("map_max", "per image: the largest value of its tiles' anomaly maps at `image_size`; combined-score models"),
    (
        "anomaly_map",
        "per row of `input`: the local-feature anomaly map [1, 448, 448] (before resizing to the image); combined-score models",
    ),
];

/// The ONNX model of a detector's scoring pass, with its metadata properties.
pub fn scoring_graph(det: &Detector, name: &str) -> Result<ModelProto> {
    let m = &det.model;
    let manifest = &m.manifest;
    let views = manifest.test_views.max(1) as i64;
    let combined = match manifest.image_score {
        ImageScore::FlowAndMapMax(st) => Some(st),
        ImageScore::Flow => None,
    };
    if combined.is_some() && views > 1 {
        return Err(Error::Config(format!(
            "the model combines the flow's score with its feature map over {views} rotated views; the exported graph maps one view \
             per image (rotating maps back is not exported): export a model trained with --test-views 1 or --image-score flow"
        )));
    }
    let mut g = GraphBuilder::default();
    g.input("input", DataType::FLOAT, &[Dim::Named("N"), Dim::Fixed(3), Dim::Fixed(INPUT_SIZE as i64), Dim::Fixed(INPUT_SIZE as i64)]);
    // tiles per image (rows = images × tiles × views) and the size a tile's map is resized to
    // (its own; the image's for one tile), both with defaults
    g.input("tiles", DataType::INT64, &[Dim::Fixed(1)]);
    g.named_i64s("tiles", &[1]);
    g.input("image_size", DataType::INT64, &[Dim::Fixed(2)]);
    g.named_i64s("image_size", &[INPUT_SIZE as i64, INPUT_SIZE as i64]);

    // f_ex (fig. 2): three scales by nearest subsampling, each through the backbone, stage maps
    // average-pooled; ordered by scale, then stage (as `backbone::multiscale_features`).
    let stages = det.extractor.stages().to_vec();
    let last = *stages.iter().max().ok_or_else(|| Error::Config("no feature stage".into()))?;
    let mut pooled = vec![];
    let mut local_maps = vec![];
    for s in 0..N_SCALES {
        let x = if s == 0 { "input".to_string() } else { subsample(&mut g, "input", 1 << s) };
        let layers = det.extractor.backbone.layers(INPUT_SIZE >> s, last)?;
        let mut maps = HashMap::new();
        emit_layers(&mut g, &layers, &x, &mut maps);
        for st in &stages {
            let map = maps.get(st).ok_or_else(|| Error::Config(format!("the backbone's layers do not reach stage {st}")))?;
            let gap = g.op("GlobalAveragePool", &[map], &[]);
            pooled.push(g.op("Flatten", &[&gap], &[("axis", Attr::Int(1))]));
            if s == 0 {
                local_maps.push((map.clone(), stage_side(&layers, INPUT_SIZE, *st)));
            }
        }
    }
    let pooled: Vec<&str> = pooled.iter().map(String::as_str).collect();
    let features = g.op("Concat", &pooled, &[("axis", Attr::Int(1))]);

    let (z, logdet) = emit_flow(&mut g, &m.flow, &features, manifest.flow_storage == FlowStorage::F16)?;
    let dim = m.flow.config.dim as f32;
    let z2 = g.op("Mul", &[&z, &z], &[]);
    let axis1 = g.i64s(&[1]);
    let sum_z2 = g.op("ReduceSum", &[&z2, &axis1], &[("keepdims", Attr::Int(0))]);
    let d = g.scalar(dim);
    match manifest.score {
        ScoreKind::MeanZ2 => g.op_into("Div", &[&sum_z2, &d], &[], "view_score"),
        ScoreKind::Nll => {
            let half = g.scalar(0.5);
            let h = g.op("Mul", &[&sum_z2, &half], &[]);
            let nll = g.op("Sub", &[&h, &logdet], &[]);
            let per_dim = g.op("Div", &[&nll, &d], &[]);
            let c = g.scalar((0.5 * (2.0 * std::f64::consts::PI).ln()) as f32);
            g.op_into("Add", &[&per_dim, &c], &[], "view_score");
        }
    }
    // rows are images × tiles × views: each tile's views averaged (eq. 5), the largest tile's
    let minus_one = g.i64s(&[-1]);
    let v = g.i64s(&[views]);
    let shape = g.op("Concat", &[&minus_one, "tiles", &v], &[("axis", Attr::Int(0))]);
    let per_tile = g.op("Reshape", &["view_score", &shape], &[]);
    let tile_means = g.op("ReduceMean", &[&per_tile], &[("axes", Attr::Ints(vec![2])), ("keepdims", Attr::Int(0))]);
    g.op_into("ReduceMax", &[&tile_means], &[("axes", Attr::Ints(vec![1])), ("keepdims", Attr::Int(0))], "flow_score");

    // the decision in f64, as the native one
    let flow_f64 = g.op("Cast", &["flow_score"], &[("to", Attr::Int(DataType::DOUBLE as i64))]);
    let score = match combined {
        Some(st) => {
            let density =
                m.local.as_ref().ok_or_else(|| Error::Config("the model combines a feature map but has no local density".into()))?;
            let row_max = emit_feature_map(&mut g, &local_maps, density)?;
            let shape = g.op("Concat", &[&minus_one, "tiles"], &[("axis", Attr::Int(0))]);
            let per_image = g.op("Reshape", &[&row_max, &shape], &[]);
            g.op_into("ReduceMax", &[&per_image], &[("axes", Attr::Ints(vec![1])), ("keepdims", Attr::Int(0))], "map_max");
            let map_f64 = g.op("Cast", &["map_max"], &[("to", Attr::Int(DataType::DOUBLE as i64))]);
            let standardized = |g: &mut GraphBuilder, x: &str, mean: f64, std: f64| {
                let (mu, sd) = (g.scalar_f64(mean), g.scalar_f64(std));
                let c = g.op("Sub", &[x, &mu], &[]);
                g.op("Div", &[&c, &sd], &[])
            };
            let a = standardized(&mut g, &flow_f64, st.flow_mean, st.flow_std);
            let b = standardized(&mut g, &map_f64, st.map_max_mean, st.map_max_std);
            g.op("Add", &[&a, &b], &[])
        }
        None => flow_f64,
    };
    let to_f32 = [("to", Attr::Int(DataType::FLOAT as i64))];
    g.op_into("Cast", &[&score], &to_f32, "score");

    let threshold = manifest.threshold.as_ref().map(|t| t.value);
    if let (Some(t), Some(r)) = (threshold, manifest.score_range) {
        let (tc, sc, half) = (g.scalar_f64(t), g.scalar_f64(r.span(t)), g.scalar_f64(0.5));
        let c = g.op("Sub", &[&score, &tc], &[]);
        let q = g.op("Div", &[&c, &sc], &[]);
        let shifted = g.op("Add", &[&q, &half], &[]);
        let (lo, hi) = (g.scalar_f64(0.0), g.scalar_f64(1.0));
        let clipped = g.op("Clip", &[&shifted, &lo, &hi], &[]);
        g.op_into("Cast", &[&clipped], &to_f32, "pred_score");
    }
    if let Some(t) = threshold {
        let tc = g.scalar_f64(t);
        g.op_into("GreaterOrEqual", &[&score, &tc], &[], "pred_label");
    }

    for (out, doc) in OUTPUTS {
        let present = match out {
            "pred_score" => threshold.is_some() && manifest.score_range.is_some(),
            "pred_label" => threshold.is_some(),
            "map_max" | "anomaly_map" => combined.is_some(),
            _ => true,
        };
        if !present {
            continue;
        }
        let (elem, dims) = match out {
            "pred_label" => (DataType::BOOL, vec![Dim::Named("images")]),
            "view_score" => (DataType::FLOAT, vec![Dim::Named("N")]),
            "anomaly_map" => {
                (DataType::FLOAT, vec![Dim::Named("N"), Dim::Fixed(1), Dim::Fixed(INPUT_SIZE as i64), Dim::Fixed(INPUT_SIZE as i64)])
            }
            _ => (DataType::FLOAT, vec![Dim::Named("images")]),
        };
        g.output(out, elem, &dims, doc);
    }
    let doc = format!("differnet {} model `{name}`: anomaly scores of parts from their views (docs/deploy.md)", manifest.backbone.id());
    Ok(g.finish(name, &doc, &super::metadata(det)?))
}

/// Every `f`-th row and column from the first (`backbone::downsample_nearest`).
fn subsample(g: &mut GraphBuilder, x: &str, f: i64) -> String {
    let rows = g.slice(x, 2, 0, i64::MAX, f);
    g.slice(&rows, 3, 0, i64::MAX, f)
}

/// The nodes of `layers` applied to `x`; stage outputs recorded in `maps`. Returns the last map.
fn emit_layers(g: &mut GraphBuilder, layers: &[Layer], x: &str, maps: &mut HashMap<usize, String>) -> String {
    let mut cur = x.to_string();
    for layer in layers {
        cur = match layer {
            Layer::Conv(c) => {
                let w = g.f32s(&format!("backbone.{}.weight", c.name), &c.shape, &c.weight);
                let b = g.f32s(&format!("backbone.{}.bias", c.name), &[c.shape[0]], &c.bias);
                let k = c.shape[2] as i64;
                let y = g.op(
                    "Conv",
                    &[&cur, &w, &b],
                    &[
                        ("kernel_shape", Attr::Ints(vec![k, k])),
                        ("strides", Attr::Ints(vec![c.stride as i64; 2])),
                        ("pads", Attr::Ints(c.padding.iter().map(|&p| p as i64).collect())),
                        ("group", Attr::Int(c.groups as i64)),
                    ],
                );
                match c.activation {
                    Activation::None => y,
                    Activation::Relu => g.op("Relu", &[&y], &[]),
                    Activation::Relu6 => {
                        let (lo, hi) = (g.scalar(0.0), g.scalar(6.0));
                        g.op("Clip", &[&y, &lo, &hi], &[])
                    }
                }
            }
            Layer::MaxPool { kernel, stride } => g.op(
                "MaxPool",
                &[&cur],
                &[("kernel_shape", Attr::Ints(vec![*kernel as i64; 2])), ("strides", Attr::Ints(vec![*stride as i64; 2]))],
            ),
            Layer::Residual(inner) => {
                let y = emit_layers(g, inner, &cur, maps);
                g.op("Add", &[&cur, &y], &[])
            }
            Layer::StageOutput(s) => {
                maps.insert(*s, cur.clone());
                cur
            }
        };
    }
    cur
}

/// The side of stage `stage`'s map for a square input of side `input`.
fn stage_side(layers: &[Layer], input: usize, stage: usize) -> usize {
    fn walk(layers: &[Layer], mut side: usize, stage: usize) -> (usize, bool) {
        for l in layers {
            match l {
                Layer::Conv(c) => side = (side + c.padding[0] + c.padding[2] - c.shape[2]) / c.stride + 1,
                Layer::MaxPool { kernel, stride } => side = (side - kernel) / stride + 1,
                Layer::Residual(inner) => side = walk(inner, side, stage).0,
                Layer::StageOutput(s) if *s == stage => return (side, true),
                Layer::StageOutput(_) => {}
            }
        }
        (side, false)
    }
    walk(layers, input, stage).0
}

/// The flow's nodes (fig. 3, eq. 2): z and log|det J| of `y`; `f16`: its weights stored in f16
/// (an f16 model's, exactly) and widened in the graph.
fn emit_flow(g: &mut GraphBuilder, flow: &NormalizingFlow, y: &str, f16: bool) -> Result<(String, String)> {
    let (n1, d) = (flow.config.dim / 2, flow.config.dim as i64);
    let alpha = flow.config.alpha;
    let mut x = y.to_string();
    let mut logdet: Option<String> = None;
    for (k, b) in flow.blocks.iter().enumerate() {
        let perm: Vec<i64> = b.perm.iter().map(|&p| p as i64).collect();
        let perm = g.i64s(&perm);
        let xp = g.op("Gather", &[&x, &perm], &[("axis", Attr::Int(1))]);
        let x1 = g.slice(&xp, 1, 0, n1 as i64, 1);
        let x2 = g.slice(&xp, 1, n1 as i64, d, 1);
        let (ls2, t2) = emit_scale_shift(g, &b.s2, &format!("flow.blocks.{k}.s2"), &x2, n1, alpha, f16)?;
        let e2 = g.op("Exp", &[&ls2], &[]);
        let m1 = g.op("Mul", &[&e2, &x1], &[]);
        let y1 = g.op("Add", &[&m1, &t2], &[]);
        let (ls1, t1) = emit_scale_shift(g, &b.s1, &format!("flow.blocks.{k}.s1"), &y1, d as usize - n1, alpha, f16)?;
        let e1 = g.op("Exp", &[&ls1], &[]);
        let m2 = g.op("Mul", &[&e1, &x2], &[]);
        let y2 = g.op("Add", &[&m2, &t1], &[]);
        let cat = g.op("Concat", &[&y1, &y2], &[("axis", Attr::Int(1))]);
        let (lo, hi) = (g.scalar(-1e6), g.scalar(1e6));
        x = g.op("Clip", &[&cat, &lo, &hi], &[]);
        let axis = g.i64s(&[1]);
        let s1 = g.op("ReduceSum", &[&ls1, &axis], &[("keepdims", Attr::Int(0))]);
        let s2 = g.op("ReduceSum", &[&ls2, &axis], &[("keepdims", Attr::Int(0))]);
        let ld = g.op("Add", &[&s1, &s2], &[]);
        logdet = Some(match logdet {
            None => ld,
            Some(acc) => g.op("Add", &[&acc, &ld], &[]),
        });
    }
    Ok((x, logdet.expect("a flow has at least one block")))
}

/// A subnet's output split into (soft-clamped log-scale, shift) for a half of length `n`.
fn emit_scale_shift(g: &mut GraphBuilder, s: &Subnet, name: &str, x: &str, n: usize, alpha: f64, f16: bool) -> Result<(String, String)> {
    let mut h = x.to_string();
    for (i, l) in s.layers.iter().enumerate() {
        let w = l.weight.as_tensor();
        let (out, inp) = w.dims2()?;
        let (w, b) = (w.flatten_all()?.to_vec1::<f32>()?, l.bias.as_tensor().to_vec1::<f32>()?);
        let (wn, bn) = (format!("{name}.{}.weight", 2 * i), format!("{name}.{}.bias", 2 * i));
        let (wn, bn) = if f16 {
            (g.f16s_as_f32(&wn, &[out, inp], &w), g.f16s_as_f32(&bn, &[out], &b))
        } else {
            (g.f32s(&wn, &[out, inp], &w), g.f32s(&bn, &[out], &b))
        };
        h = g.op("Gemm", &[&h, &wn, &bn], &[("transB", Attr::Int(1))]);
        if i < 3 {
            h = g.op("Relu", &[&h], &[]);
        }
    }
    let raw = g.slice(&h, 1, 0, n as i64, 1);
    let shift = g.slice(&h, 1, n as i64, 2 * n as i64, 1);
    // log e(s) = α·0.636·atan(s/α) (flow::soft_clamp)
    let a = g.scalar(alpha as f32);
    let scaled = g.op("Div", &[&raw, &a], &[]);
    let at = g.op("Atan", &[&scaled], &[]);
    let f = g.scalar(soft_clamp_factor(alpha) as f32);
    Ok((g.op("Mul", &[&at, &f], &[]), shift))
}

/// The local-feature anomaly map of the first scale (`localize::feature_map` for one view):
/// stage maps on the largest grid, Mahalanobis distances to the local Gaussian (the larger of
/// the fine and the eroded coarse scale's, `LocalDensity::image_distances`), bilinear to 448², Gaussian
/// blur; output `anomaly_map`, and `map_max`, its maximum after resizing to the input
/// `image_size` (default 448 × 448), per row; returns the latter.
fn emit_feature_map(g: &mut GraphBuilder, maps: &[(String, usize)], density: &LocalDensity) -> Result<String> {
    let side = maps.iter().map(|m| m.1).max().unwrap_or(1);
    let mut same = vec![];
    for (map, s) in maps {
        if *s == side {
            same.push(map.clone());
            continue;
        }
        if side % s != 0 {
            return Err(Error::Config(format!("stage maps of {s} and {side} positions are not a whole factor apart")));
        }
        let f = (side / s) as f32;
        let scales = g.f32s(&format!("upsample_{s}_to_{side}"), &[4], &[1.0, 1.0, f, f]);
        same.push(g.op(
            "Resize",
            &[map, "", &scales],
            &[
                ("mode", Attr::Str("nearest")),
                ("coordinate_transformation_mode", Attr::Str("asymmetric")),
                ("nearest_mode", Attr::Str("floor")),
            ],
        ));
    }
    let same: Vec<&str> = same.iter().map(String::as_str).collect();
    let all = g.op("Concat", &same, &[("axis", Attr::Int(1))]);
    let mut dist = emit_distances(g, &all, side, &density.fine, TENSOR_PREFIX);
    if let Some(c) = &density.coarse {
        // `local_density::box_average`: the window clipped at the border, only its cells counted
        let (k, r) = (2 * c.radius as i64 + 1, c.radius as i64);
        let boxed = g.op(
            "AveragePool",
            &[&all],
            &[("kernel_shape", Attr::Ints(vec![k, k])), ("pads", Attr::Ints(vec![r, r, r, r])), ("count_include_pad", Attr::Int(0))],
        );
        let mut coarse = emit_distances(g, &boxed, side, &c.gaussian, COARSE_TENSOR_PREFIX);
        if c.eroded {
            // `local_density::min_filter`: −max(−x) over the same window; MaxPool ignores its pads
            let one = g.i64s(&[1]);
            let grid = g.op("Unsqueeze", &[&coarse, &one], &[]);
            let negated = g.op("Neg", &[&grid], &[]);
            let pooled = g.op("MaxPool", &[&negated], &[("kernel_shape", Attr::Ints(vec![k, k])), ("pads", Attr::Ints(vec![r, r, r, r]))]);
            let eroded = g.op("Neg", &[&pooled], &[]);
            coarse = g.op("Squeeze", &[&eroded, &one], &[]);
        }
        dist = g.op("Max", &[&dist, &coarse], &[]);
    }
    let one = g.i64s(&[1]);
    let grid = g.op("Unsqueeze", &[&dist, &one], &[]);
    let lead = g.op("Shape", &[&grid], &[("start", Attr::Int(0)), ("end", Attr::Int(2))]);
    let square = g.i64s(&[INPUT_SIZE as i64, INPUT_SIZE as i64]);
    let sizes = g.op("Concat", &[&lead, &square], &[("axis", Attr::Int(0))]);
    let full = bilinear(g, &grid, &sizes);
    let blurred = emit_blur(g, &full, INPUT_SIZE, FEATURE_MAP_SIGMA);
    g.op_into("Identity", &[&blurred], &[], "anomaly_map");
    // resized to the image (or tile) it came from, then its largest value
    let lead = g.op("Shape", &["anomaly_map"], &[("start", Attr::Int(0)), ("end", Attr::Int(2))]);
    let sizes = g.op("Concat", &[&lead, "image_size"], &[("axis", Attr::Int(0))]);
    let at_image = bilinear(g, "anomaly_map", &sizes);
    Ok(g.op("ReduceMax", &[&at_image], &[("axes", Attr::Ints(vec![1, 2, 3])), ("keepdims", Attr::Int(0))]))
}

/// Mahalanobis distances [N, side, side] of [N, C, side, side] local vectors under `gaussian`
/// (its tensors named `{prefix}.mean`, `{prefix}.precision`), made into the vectors it models
/// first (image contrast).
fn emit_distances(g: &mut GraphBuilder, nchw: &str, side: usize, gaussian: &LocalGaussian, prefix: &str) -> String {
    let mut nhwc = g.op("Transpose", &[nchw], &[("perm", Attr::Ints(vec![0, 2, 3, 1]))]);
    if gaussian.image_contrast {
        nhwc = emit_image_contrast(g, &nhwc, side, gaussian.dim / 2);
    }
    let c = gaussian.dim;
    let mean = g.f32s(&format!("{prefix}.mean"), &[c], &gaussian.mean);
    let precision = g.f32s(&format!("{prefix}.precision"), &[c, c], &gaussian.precision);
    let centred = g.op("Sub", &[&nhwc, &mean], &[]);
    let y = g.op("MatMul", &[&centred, &precision], &[]);
    let prod = g.op("Mul", &[&centred, &y], &[]);
    let last = g.i64s(&[-1]);
    let q = g.op("ReduceSum", &[&prod, &last], &[("keepdims", Attr::Int(0))]);
    let q = g.op("Relu", &[&q], &[]);
    g.op("Sqrt", &[&q], &[])
}

/// `local_density::modelled_vectors` with image contrast on [N, side, side, C] local vectors,
/// N = images × `tiles` (one view): each vector followed by its difference from its image's
/// median over all its tiles' positions (TopK of the n values, its last: rank ⌊n / 2⌋ from
/// below); [N, side, side, 2C].
fn emit_image_contrast(g: &mut GraphBuilder, nhwc: &str, side: usize, channels: usize) -> String {
    let positions = g.i64s(&[(side * side) as i64]);
    let n = g.op("Mul", &["tiles", &positions], &[]);
    let (minus_one, c) = (g.i64s(&[-1]), g.i64s(&[channels as i64]));
    let per_image = g.op("Concat", &[&minus_one, &n, &c], &[("axis", Attr::Int(0))]);
    let flat = g.op("Reshape", &[nhwc, &per_image], &[]);
    let two = g.i64s(&[2]);
    let half = g.op("Div", &[&n, &two], &[]);
    let k = g.op("Sub", &[&n, &half], &[]);
    let top = g.op_outputs("TopK", &[&flat, &k], &[("axis", Attr::Int(1)), ("largest", Attr::Int(1)), ("sorted", Attr::Int(1))], 2);
    let one = g.i64s(&[1]);
    let last = g.op("Sub", &[&k, &one], &[]);
    let median = g.op("Gather", &[&top[0], &last], &[("axis", Attr::Int(1))]);
    let contrast = g.op("Sub", &[&flat, &median], &[]);
    let both = g.op("Concat", &[&flat, &contrast], &[("axis", Attr::Int(2))]);
    let grid_shape = g.i64s(&[-1, side as i64, side as i64, 2 * channels as i64]);
    g.op("Reshape", &[&both, &grid_shape], &[])
}

/// Bilinear resize to `sizes` (half-pixel centres, edges clamped: `localize::resize_plane`).
fn bilinear(g: &mut GraphBuilder, x: &str, sizes: &str) -> String {
    g.op("Resize", &[x, "", "", sizes], &[("mode", Attr::Str("linear")), ("coordinate_transformation_mode", Attr::Str("half_pixel"))])
}

/// Separable Gaussian blur of [N, 1, n, n] maps with mirrored edges (`localize::gaussian_blur`:
/// scipy's `reflect`, the edge pixel repeated), kernel truncated at 4σ.
fn emit_blur(g: &mut GraphBuilder, x: &str, n: usize, sigma: f32) -> String {
    let r = (4.0 * sigma + 0.5) as usize;
    let kernel = crate::localize::gaussian_kernel(sigma);
    let mut cur = x.to_string();
    for axis in [3i64, 2] {
        let before = g.slice(&cur, axis, r as i64 - 1, i64::MIN, -1);
        let after = g.slice(&cur, axis, n as i64 - 1, (n - r) as i64 - 1, -1);
        let padded = g.op("Concat", &[&before, &cur, &after], &[("axis", Attr::Int(axis))]);
        let shape = if axis == 3 { [1, 1, 1, kernel.len()] } else { [1, 1, kernel.len(), 1] };
        let w = g.f32s(&format!("blur_{axis}"), &shape, &kernel);
        cur = g.op("Conv", &[&padded, &w], &[("kernel_shape", Attr::Ints(vec![shape[2] as i64, shape[3] as i64]))]);
    }
    cur
}

#[cfg(test)]
mod tests {
    use super::stage_side;
    use crate::backbone::{AlexNet, Backbone, Vgg16};
    use candle_core::{Device, Tensor};

    /// The sides the layer lists imply are those of the maps the networks compute.
    #[test]
    fn layer_lists_give_the_stage_map_sides() {
        let dev = Device::Cpu;
        let nets: [(Box<dyn Backbone>, usize); 2] =
            [(Box::new(AlexNet::random(&dev).unwrap()), 0), (Box::new(Vgg16::random(&dev).unwrap()), 2)];
        for (net, stage) in nets {
            for size in [112, 100] {
                let x = Tensor::zeros((1, 3, size, size), candle_core::DType::F32, &dev).unwrap();
                let maps = net.stage_maps(&x, &[stage]).unwrap();
                let layers = net.layers(size, stage).unwrap();
                assert_eq!(maps[0].dims()[2], stage_side(&layers, size, stage), "{:?} at {size}", net.kind());
            }
        }
    }
}
