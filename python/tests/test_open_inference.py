"""`differnet serve` through the official KServe v2 / Triton client (`tritonclient[http]`).

Health, metadata and infer with BYTES images give the same scores as `/v1/score`; junk and bombs
get the 4xx they get on `/v1/score`. Needs the CLI binary (DIFFERNET_BIN overrides where it is)
and the EfficientNet-Lite0 weights. Run: `pytest python/tests`."""

import http.client
import json
import os
import pathlib
import socket
import struct
import subprocess
import time
import zlib

import numpy as np
import pytest

tritonclient_http = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
BIN = os.environ.get("DIFFERNET_BIN", str(ROOT / "target" / "release" / "differnet"))


def cli(*args):
    out = subprocess.run([BIN, "--quiet", *args], capture_output=True, text=True)
    assert out.returncode == 0, f"differnet {' '.join(args)}: {out.stderr}"
    return out.stdout


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bomb_png(side=60000):
    """A PNG whose valid header claims side x side pixels and that has no image data."""
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + ihdr + struct.pack(">I", zlib.crc32(ihdr))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("v2")
    data = root / "data"
    cli("synth", "textures", "--out", str(data), "--train", "12", "--test-good", "2", "--per-defect", "1", "--seed", "2")
    model = root / "part.safetensors"
    cli("train", "--data", str(data), "--out", str(model), "--cache-dir", str(root / "cache"),
        "--schedule", "fast", "--epochs", "2", "--blocks", "2", "--hidden", "64", "--seed", "1")
    port = free_port()
    proc = subprocess.Popen([BIN, "--quiet", "serve", "--model", f"part={model}", "--addr", f"127.0.0.1:{port}"],
                            stderr=subprocess.PIPE)
    try:
        for _ in range(240):
            if proc.poll() is not None:
                pytest.fail(f"differnet serve exited: {proc.stderr.read().decode()}")
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                c.request("GET", "/healthz")
                if c.getresponse().status == 200:
                    break
            except OSError:
                time.sleep(0.25)
        yield {"url": f"127.0.0.1:{port}", "port": port, "images": sorted((data / "test").rglob("*.png")), "model": model}
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def v1_scores(port, images):
    out = []
    for image in images:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        c.request("POST", "/v1/score", body=image if isinstance(image, bytes) else image.read_bytes())
        r = c.getresponse()
        assert r.status == 200
        out.append(json.loads(r.read())["results"][0])
    return out


def bytes_input(blobs, binary=True):
    inp = tritonclient_http.InferInput("input", [len(blobs)], "BYTES")
    inp.set_data_from_numpy(np.array(blobs, dtype=np.object_), binary_data=binary)
    return inp


def test_health_and_metadata(server):
    client = tritonclient_http.InferenceServerClient(url=server["url"])
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("part")
    assert not client.is_model_ready("no-such-model")
    meta = client.get_model_metadata("part")
    assert meta["name"] == "part"
    assert meta["inputs"] == [{"name": "input", "datatype": "BYTES", "shape": [-1]}]
    assert [o["name"] for o in meta["outputs"]] == ["score", "pred_score", "pred_label"]


@pytest.mark.parametrize("binary", [True, False])
def test_infer_gives_the_scores_of_v1(server, binary):
    client = tritonclient_http.InferenceServerClient(url=server["url"])
    images = server["images"]
    want = v1_scores(server["port"], images)
    if binary:
        # binary BYTES elements; no outputs named: all come back as binary data
        result = client.infer("part", [bytes_input([p.read_bytes() for p in images])])
    else:
        # base64 strings in the JSON body, outputs asked for as JSON
        import base64
        blobs = [base64.b64encode(p.read_bytes()).decode() for p in images]
        outputs = [tritonclient_http.InferRequestedOutput(n, binary_data=False) for n in ["score", "pred_score", "pred_label"]]
        result = client.infer("part", [bytes_input(blobs, binary=False)], outputs=outputs)
    np.testing.assert_array_equal(result.as_numpy("score"), [w["score"] for w in want])
    np.testing.assert_array_equal(result.as_numpy("pred_score"), [w["pred_score"] for w in want])
    np.testing.assert_array_equal(result.as_numpy("pred_label"), [w["pred_label"] for w in want])


def test_junk_and_bombs_are_refused_as_on_v1(server):
    client = tritonclient_http.InferenceServerClient(url=server["url"])
    for blob, status in [(b"certainly not an image", "422"), (bomb_png(), "413")]:
        with pytest.raises(InferenceServerException) as e:
            client.infer("part", [bytes_input([blob])])
        assert e.value.status() == status, e.value
        c = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=60)
        c.request("POST", "/v1/score", body=blob)
        assert str(c.getresponse().status) == status


def test_fp32_network_inputs_give_the_scores_of_their_images(server):
    """Preprocessed views (as the exported ONNX graph takes them) score as the encoded images
    they came from; 448 x 448 images, where a combined score's map maximum is taken."""
    import io

    from PIL import Image

    import differnet

    det = differnet.Detector.load(server["model"], no_cache=True)
    pictures = [Image.open(p).convert("RGB").resize((448, 448)) for p in server["images"][:3]]
    pngs = []
    for pic in pictures:
        buf = io.BytesIO()
        pic.save(buf, format="PNG")
        pngs.append(buf.getvalue())
    want = [w["score"] for w in v1_scores(server["port"], pngs)]
    feeds = [det.network_inputs(np.asarray(pic)) for pic in pictures]
    assert all(f["tiles"][0] == 1 for f in feeds)
    batch = np.concatenate([f["input"] for f in feeds])
    inp = tritonclient_http.InferInput("input", list(batch.shape), "FP32")
    inp.set_data_from_numpy(batch, binary_data=True)
    client = tritonclient_http.InferenceServerClient(url=server["url"], network_timeout=120)
    result = client.infer("part", [inp])
    np.testing.assert_allclose(result.as_numpy("score"), want, rtol=1e-5)
    # a tensor that is not [N, 3, 448, 448] is refused
    bad = tritonclient_http.InferInput("input", [1, 3, 224, 224], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 3, 224, 224), dtype=np.float32), binary_data=True)
    with pytest.raises(InferenceServerException) as e:
        client.infer("part", [bad])
    assert e.value.status() == "400" and "448" in str(e.value)
