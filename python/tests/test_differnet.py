"""The Python package against the CLI: same scores, same models, clear errors.

Needs the CLI binary (`cargo build --release`; DIFFERNET_BIN overrides where it is) and the
EfficientNet-Lite0 weights (`differnet weights fetch`). Run: `pytest python/tests`."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

import differnet

ROOT = pathlib.Path(__file__).resolve().parents[2]
BIN = os.environ.get("DIFFERNET_BIN", str(ROOT / "target" / "release" / "differnet"))
# a small flow and few epochs: the comparisons need equal models, not good ones
TRAIN = {"epochs": 2, "blocks": 2, "hidden": 64, "seed": 3, "backbone": "efficientnet-lite0"}


def cli(*args):
    out = subprocess.run([BIN, "--quiet", *args], capture_output=True, text=True)
    assert out.returncode == 0, f"differnet {' '.join(args)}: {out.stderr}"
    return out.stdout


def cli_flags(options):
    flags = []
    for k, v in options.items():
        flags += [f"--{k.replace('_', '-')}", str(v)]
    return flags


@pytest.fixture(scope="session")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("differnet")
    data = root / "data"
    cli("synth", "textures", "--out", str(data), "--train", "16", "--test-good", "4", "--per-defect", "2", "--seed", "1")
    return root


@pytest.fixture(scope="session")
def cli_model(work):
    path = work / "cli.safetensors"
    cli("train", "--data", str(work / "data"), "--out", str(path), "--cache-dir", str(work / "cache"), *cli_flags(TRAIN))
    return path


@pytest.fixture(scope="session")
def detector(cli_model, work):
    return differnet.Detector.load(cli_model, cache_dir=work / "cache")


def test_scores_equal_the_clis_predict(detector, cli_model, work):
    images = sorted(str(p) for p in (work / "data" / "test").rglob("*.png"))
    rows = json.loads(cli("--json", "predict", "--model", str(cli_model), "--cache-dir", str(work / "cache"), *images))
    got = detector.predict(images)
    assert len(got) == len(rows) == len(images)
    for g, r in zip(got, rows):
        assert abs(g["score"] - r["score"]) <= 1e-6 * max(1.0, abs(r["score"]))
        assert g["pred_label"] == r["pred_label"]
        assert (g["pred_score"] is None) == (r["pred_score"] is None)
        if r["pred_score"] is not None:
            assert abs(g["pred_score"] - r["pred_score"]) <= 1e-6
    assert detector.threshold is not None, "train holds out images and stores a threshold"


def test_numpy_input_equals_path_input(detector, work):
    path = sorted((work / "data" / "test").rglob("*.png"))[0]
    rgb = np.asarray(Image.open(path).convert("RGB"))
    by_path = detector.score(str(path))[0]
    by_array = detector.score(rgb)[0]
    assert abs(by_path - by_array) <= 1e-6 * max(1.0, abs(by_path))
    # grey and RGBA arrays convert as decoding a file does: grey repeated, alpha dropped
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)])
    assert detector.score(rgba)[0] == by_array
    grey = np.ascontiguousarray(rgb[:, :, 0])
    assert detector.score(grey)[0] == detector.score(np.dstack([grey] * 3))[0]
    # a heat map at the image's resolution, the same for both inputs
    m = detector.heat_map(rgb)
    assert m.dtype == np.float32 and m.shape == rgb.shape[:2]
    assert np.array_equal(m, detector.heat_map(path))
    assert np.isfinite(m).all() and m.max() > m.min()


@pytest.mark.parametrize(
    "array, says",
    [
        (np.zeros((32, 32, 3), np.float32), "dtype"),
        (np.zeros((0, 32, 3), np.uint8), "no pixels"),
        (np.zeros((32, 32, 5), np.uint8), "5 channels"),
        (np.zeros((64, 64, 3), np.uint8)[::2, ::2], "contiguous"),
        (np.zeros((2, 32, 32, 3), np.uint8), "shape"),
        ([[1, 2], [3, 4]], "numpy array"),
    ],
)
def test_bad_arrays_raise_value_error(detector, array, says):
    with pytest.raises(ValueError, match=says):
        detector.score(array)
    with pytest.raises(ValueError, match=says):
        detector.heat_map(array)


def test_bad_files_raise_with_the_file_named(detector, tmp_path):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    with pytest.raises((ValueError, OSError), match="corrupt.safetensors"):
        differnet.Detector.load(corrupt)
    with pytest.raises(OSError, match="missing.safetensors"):
        differnet.Detector.load(tmp_path / "missing.safetensors")
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    with pytest.raises(ValueError, match="notes.png"):
        detector.score(str(not_image))
    with pytest.raises(ValueError, match="unknown field `epoch`"):
        differnet.train(tmp_path, tmp_path / "m.safetensors", progress=False, epoch=3)


def test_train_from_python_gives_the_clis_model(cli_model, work):
    calls = []
    out = work / "python.safetensors"
    det = differnet.train(work / "data", out, progress=lambda *a: calls.append(a), cache_dir=work / "cache", **TRAIN)
    assert isinstance(det, differnet.Detector) and out.is_file()
    mine, theirs = det.manifest, json.loads(cli("--json", "info", str(cli_model)))
    for key in ("parameters_sha256", "threshold", "score_range", "permutations", "local_density", "localization", "train"):
        assert mine[key] == theirs[key], key
    assert mine["training"]["epoch_losses"] == theirs["training"]["epoch_losses"]
    assert {c[0] for c in calls} == {"features", "flow", "calibrate"}
    assert ("flow", TRAIN["epochs"], TRAIN["epochs"], None) in calls, "the last epoch is reported"


def test_interrupting_training_leaves_no_model(work, tmp_path):
    out = tmp_path / "stopped.safetensors"

    def stop(phase, position, length, message):
        if phase == "flow" and position >= 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        differnet.train(work / "data", out, progress=stop, cache_dir=work / "cache", **{**TRAIN, "epochs": 5})
    assert not out.exists()
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_evaluate_returns_the_fields_of_test_json(detector, cli_model, work):
    ev = differnet.evaluate(detector, work / "data")
    theirs = json.loads(cli("--json", "test", "--model", str(cli_model), "--data", str(work / "data"), "--cache-dir", str(work / "cache")))
    assert set(ev) == set(theirs)
    assert ev["image_auroc"] == pytest.approx(theirs["image_auroc"], abs=1e-9)
    assert 0.0 <= ev["image_auroc"] <= 1.0


def test_fetch_weights_finds_the_installed_weights():
    path = differnet.fetch_weights("efficientnet-lite0")
    assert os.path.isfile(path)
    with pytest.raises(ValueError, match="resnet"):
        differnet.fetch_weights("resnet")


def test_ctrl_c_stops_training_cleanly(work, tmp_path):
    out = tmp_path / "long.safetensors"
    script = (
        # Python keeps SIGINT ignored when the parent ignored it (a job started in the background
        # by a non-interactive shell, as CI may be): install the handler a terminal would give.
        "import signal, sys, differnet\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "def show(phase, position, length, message):\n"
        "    if phase == 'flow' and position == 1: print('training', flush=True)\n"
        f"differnet.train({str(work / 'data')!r}, {str(out)!r}, progress=show, cache_dir={str(work / 'cache')!r}, "
        f"**{{**{TRAIN!r}, 'epochs': 100000}})\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "training"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode != 0 and "KeyboardInterrupt" in err, err
    assert not out.exists()


def test_long_work_releases_the_gil(detector, work):
    paths = sorted((work / "data" / "test").rglob("*.png"))
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in paths] * 3
    done = threading.Event()

    def score():
        detector.score(arrays)
        done.set()

    worker = threading.Thread(target=score)
    worker.start()
    ticks = 0
    while not done.is_set():
        ticks += 1
        time.sleep(0.001)
    worker.join()
    # with the GIL held during scoring this loop would not run until the scores were done
    assert ticks > 20, ticks
