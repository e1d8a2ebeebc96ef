//! Models for other runtimes: the scoring pass as one ONNX graph ([`onnx`], built with
//! [`graph`]) with the model's threshold, ranges and preprocessing in its metadata, and a Triton
//! model repository around it.

pub mod graph;
pub mod onnx;

use crate::error::{write_atomic, Error, Result};
use crate::model::ImageScore;
use crate::pipeline::Detector;
use crate::views::InputNormalization;
use protobuf::Message;
use std::path::{Path, PathBuf};

/// Key of the metadata property that names the layout of the others.
pub const FORMAT_KEY: &str = "differnet.format";
/// Its value for graphs written by [`write_onnx`].
pub const FORMAT: &str = "differnet-onnx-1";

/// What [`write_onnx`] wrote.
#[derive(Clone, Debug, serde::Serialize)]
pub struct OnnxExport {
    /// `DIR/model.onnx`.
    pub onnx: PathBuf,
    /// `DIR/triton/<name>/config.pbtxt`; `1/model.onnx` beside it is the same file.
    pub triton_config: PathBuf,
    pub bytes: u64,
    /// Graph outputs, in order.
    pub outputs: Vec<String>,
    /// Metadata properties written (key, value).
    pub metadata: Vec<(String, String)>,
}

/// How a decoded image becomes the rows of the graph's `input` (docs/deploy.md says the same).
pub fn preprocessing(det: &Detector) -> String {
    let norm = match det.extractor.normalization() {
        InputNormalization::Lite => "(v - 127) / 128 for every channel".to_string(),
        InputNormalization::Imagenet => "(v / 255 - mean) / std with mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225)".to_string(),
    };
    let tiles = match det.extractor.tiles() {
        1 => "the whole image".to_string(),
        0 => "square tiles along the long side when it is at least 1.5 times the short one (n = ceil(long / short) tiles, tile i at floor(i * (long - short) / (n - 1))), else the whole image".to_string(),
        n => format!("{n} square tiles of the short side along the long side, tile i at floor(i * (long - short) / {})", n - 1),
    };
    let views = det.model.manifest.test_views.max(1);
    format!(
        "decode to 8-bit RGB; cut into {tiles}; resize each to 448x448 as Pillow's Image.resize((448, 448), Image.BILINEAR); \
         view i of {views} rotated by i*360/{views} degrees counter-clockwise as Pillow's Image.rotate (nearest, black fill); \
         each 8-bit value v normalized as {norm}; channels first (RGB), rows of `input` are the views of one image (or tile) in order"
    )
}

/// The metadata properties of an exported graph: everything the model file's manifest says about
/// deciding and preprocessing, and the manifest itself.
pub fn metadata(det: &Detector) -> Result<Vec<(String, String)>> {
    let m = &det.model.manifest;
    let mut out = vec![
        (FORMAT_KEY.to_string(), FORMAT.to_string()),
        ("backbone".into(), m.backbone.id().into()),
        ("backbone_weights_sha256".into(), m.backbone_weights_sha256.clone()),
        ("parameters_sha256".into(), m.parameters_sha256.clone()),
        ("feature_stages".into(), format!("{:?}", det.extractor.stages())),
        ("input_normalization".into(), det.extractor.normalization().id().into()),
        ("test_views".into(), m.test_views.to_string()),
        ("tiles".into(), det.extractor.tiles().to_string()),
        ("score_kind".into(), serde_json::to_string(&m.score).map_err(json)?.trim_matches('"').to_string()),
        (
            "image_score".into(),
            match m.image_score {
                ImageScore::Flow => "flow".into(),
                ImageScore::FlowAndMapMax(_) => "flow-and-map-max".into(),
            },
        ),
        ("preprocessing".into(), preprocessing(det)),
    ];
    if let Some(t) = &m.threshold {
        out.push(("threshold".into(), format!("{:?}", t.value)));
        out.push(("threshold_method".into(), t.method.clone()));
    }
    if let Some(r) = m.score_range {
        out.push(("score_range_min".into(), format!("{:?}", r.min)));
        out.push(("score_range_max".into(), format!("{:?}", r.max)));
    }
    out.push(("manifest".into(), serde_json::to_string(m).map_err(json)?));
    Ok(out)
}

fn json(e: serde_json::Error) -> Error {
    Error::Config(format!("cannot write the manifest as JSON: {e}"))
}

/// Writes `dir/model.onnx` (the scoring graph of `det`) and the Triton model repository
/// `dir/triton/<name>/` (`config.pbtxt`, `1/model.onnx`: a hard link to the same file, a copy
/// where links are not possible). Files are written atomically.
pub fn write_onnx(det: &Detector, dir: &Path, name: &str) -> Result<OnnxExport> {
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
        return Err(Error::Config(format!("model name `{name}`: use letters, digits, `_` and `-` (Triton's model names)")));
    }
    let model = onnx::scoring_graph(det, name)?;
    let bytes = model.write_to_bytes().map_err(|e| Error::Config(format!("cannot encode the ONNX graph: {e}")))?;
    let version_dir = dir.join("triton").join(name).join("1");
    std::fs::create_dir_all(&version_dir).map_err(|e| Error::io(&version_dir, e))?;
    let onnx_path = dir.join("model.onnx");
    write_atomic(&onnx_path, &bytes)?;
    let linked = version_dir.join("model.onnx");
    let _ = std::fs::remove_file(&linked);
    if std::fs::hard_link(&onnx_path, &linked).is_err() {
        write_atomic(&linked, &bytes)?;
    }
    let outputs: Vec<String> = model.graph.output.iter().map(|o| o.name.clone()).collect();
    let inputs: Vec<String> = model.graph.input.iter().map(|i| i.name.clone()).collect();
    let config = triton_config(name, &inputs, &outputs);
    let config_path = dir.join("triton").join(name).join("config.pbtxt");
    write_atomic(&config_path, config.as_bytes())?;
    let metadata = model.metadata_props.iter().map(|p| (p.key.clone(), p.value.clone())).collect();
    Ok(OnnxExport { onnx: onnx_path, triton_config: config_path, bytes: bytes.len() as u64, outputs, metadata })
}

/// Triton's `config.pbtxt` for the graph: the ONNX Runtime backend, no batching by Triton (the
/// first dimension is views, grouped into images by the graph), `image_size` optional.
fn triton_config(name: &str, inputs: &[String], outputs: &[String]) -> String {
    let mut s = format!("name: \"{name}\"\nplatform: \"onnxruntime_onnx\"\nmax_batch_size: 0\ninput [\n");
    let input_lines: Vec<String> = inputs
        .iter()
        .map(|i| match i.as_str() {
            "image_size" | "tiles" => {
                format!("  {{ name: \"{i}\", data_type: TYPE_INT64, dims: [ {} ], optional: true }}", if i == "tiles" { 1 } else { 2 })
            }
            _ => format!("  {{ name: \"{i}\", data_type: TYPE_FP32, dims: [ -1, 3, 448, 448 ] }}"),
        })
        .collect();
    s += &input_lines.join(",\n");
    s += "\n]\noutput [\n";
    let output_lines: Vec<String> = outputs
        .iter()
        .map(|o| match o.as_str() {
            "pred_label" => format!("  {{ name: \"{o}\", data_type: TYPE_BOOL, dims: [ -1 ] }}"),
            "anomaly_map" => format!("  {{ name: \"{o}\", data_type: TYPE_FP32, dims: [ -1, 1, 448, 448 ] }}"),
            _ => format!("  {{ name: \"{o}\", data_type: TYPE_FP32, dims: [ -1 ] }}"),
        })
        .collect();
    s += &output_lines.join(",\n");
    s += "\n]\ninstance_group [ { kind: KIND_CPU } ]\n";
    s
}
