"""ONNX Runtime against the native model on every test image of a dataset (MVTec layout).

    python scripts/onnx_parity.py MODEL.safetensors EXPORT/model.onnx DATA [OUT.json]

Needs `pip install ./python onnx onnxruntime`. Prints the largest score difference (relative to
max(|score|, 1)), how many decisions agree, the largest pred_score difference, and the time per
image of each: ONNX Runtime from ready inputs (`Detector.network_inputs`), the native
`Detector.predict` from the file (decoding and resizing included)."""

import glob
import json
import os
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort

import differnet


def main(model, graph, data, out=None):
    onnx.checker.check_model(graph)
    det = differnet.Detector.load(model, no_cache=True)
    t0 = time.perf_counter()
    session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    load_s = time.perf_counter() - t0
    outputs = [o.name for o in session.get_outputs()]
    rows = []
    for path in sorted(glob.glob(os.path.join(data, "test", "*", "*"))):
        feed = det.network_inputs(path)
        t0 = time.perf_counter()
        native = det.predict(path)[0]
        t1 = time.perf_counter()
        got = dict(zip(outputs, session.run(None, feed)))
        t2 = time.perf_counter()
        rows.append({
            "path": path, "tiles": int(feed["tiles"][0]), "native": native["score"], "onnx": float(got["score"][0]),
            "native_s": t1 - t0, "onnx_s": t2 - t1,
            "label_equal": bool(got["pred_label"][0]) == native["pred_label"],
            "pred_score_diff": abs(float(got["pred_score"][0]) - native["pred_score"]),
        })
    rel = [abs(r["onnx"] - r["native"]) / max(abs(r["native"]), 1.0) for r in rows]
    summary = {
        "images": len(rows), "tiled": sum(r["tiles"] > 1 for r in rows),
        "worst_diff_over_max_abs_1": max(rel), "median_diff": float(np.median(rel)),
        "labels_equal": sum(r["label_equal"] for r in rows), "worst_pred_score_diff": max(r["pred_score_diff"] for r in rows),
        "onnx_s_mean": float(np.mean([r["onnx_s"] for r in rows])), "onnx_s_median": float(np.median([r["onnx_s"] for r in rows])),
        "native_s_mean": float(np.mean([r["native_s"] for r in rows])), "native_s_median": float(np.median([r["native_s"] for r in rows])),
        "session_load_s": load_s, "onnxruntime": ort.__version__,
    }
    print(json.dumps(summary, indent=1))
    if out:
        with open(out, "w") as f:
            json.dump({"summary": summary, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:])
