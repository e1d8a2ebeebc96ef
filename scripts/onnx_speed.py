"""All test views of one image through ONNX Runtime (the exported graph) and through the native
Detector, for a few one-tile good test images of a dataset.

    python scripts/onnx_speed.py MODEL.safetensors EXPORT/model.onnx DATA

With a model of many test views and a small flow (e.g. `train --image-score flow --test-views 64
--hidden 64 --blocks 2`) the backbone dominates both. ONNX Runtime is timed from ready inputs,
the native `Detector.score` from the file (decoding, resizing and rotating included); the
medians are printed."""

import glob
import json
import os
import sys
import time

import numpy as np
import onnxruntime as ort

import differnet


def main(model, graph, data):
    det = differnet.Detector.load(model, no_cache=True)
    session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    images = sorted(glob.glob(os.path.join(data, "test", "good", "*")))[:40]
    images = [p for p in images if det.network_inputs(p)["tiles"][0] == 1][:5]
    feeds = [det.network_inputs(p) for p in images]
    session.run(["score"], feeds[0])
    det.score(images[0])
    t_onnx, t_native = [], []
    for path, feed in zip(images, feeds):
        t0 = time.perf_counter()
        session.run(["score"], feed)
        t1 = time.perf_counter()
        det.score(path)
        t2 = time.perf_counter()
        t_onnx.append(t1 - t0)
        t_native.append(t2 - t1)
    print(json.dumps({"views": int(feeds[0]["input"].shape[0]), "onnx_s_median": float(np.median(t_onnx)),
                      "native_s_median": float(np.median(t_native)), "onnxruntime": ort.__version__}))


if __name__ == "__main__":
    main(*sys.argv[1:])
