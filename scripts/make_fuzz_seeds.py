#!/usr/bin/env python3
"""Writes small, valid seed inputs for the weight-file fuzz targets into fuzz/corpus/.

Standard library only (no torch, no numpy): stand-in modules named `torch`, `torch._utils` and
`numpy` make pickle emit exactly the globals and persistent ids that `torch.save` and numpy write.
Run from the repository root: python3 scripts/make_fuzz_seeds.py
"""
import collections
import io
import os
import pickle
import struct
import sys
import types
import zipfile

# --- stand-ins whose pickled references equal the real ones -----------------------------------
torch = types.ModuleType("torch")
torch_utils = types.ModuleType("torch._utils")
sys.modules["torch"], sys.modules["torch._utils"] = torch, torch_utils
torch._utils = torch_utils


def _rebuild_tensor_v2(*args):  # never called: only its name is pickled
    raise AssertionError


_rebuild_tensor_v2.__module__ = "torch._utils"
torch_utils._rebuild_tensor_v2 = _rebuild_tensor_v2
for name in ["FloatStorage", "HalfStorage", "LongStorage"]:
    cls = type(name, (), {"__module__": "torch"})
    setattr(torch, name, cls)


class Storage:
    def __init__(self, kind, key, values):
        self.kind, self.key, self.values = kind, key, values


class Tensor:
    """A tensor view of a storage, pickled as torch does: _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)."""

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def __reduce__(self):
        return (_rebuild_tensor_v2, (self.storage, self.offset, tuple(self.size), tuple(self.stride), False, collections.OrderedDict()))


def pack(kind, values):
    fmt = {"FloatStorage": "<%df", "HalfStorage": "<%de", "LongStorage": "<%dq"}[kind]
    return struct.pack(fmt % len(values), *values)


class TorchPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", getattr(torch, obj.kind), obj.key, "cpu", len(obj.values))
        return None


def state_dict():
    w = Storage("FloatStorage", "0", [0.5, -1.0, 2.0, 3.25, -0.125, 8.0])
    h = Storage("HalfStorage", "1", [1.0, -2.0, 0.5])
    n = Storage("LongStorage", "2", [7])
    sd = collections.OrderedDict()
    sd["conv.weight"] = Tensor(w, 0, [2, 3], [3, 1])
    sd["conv.weight_t"] = Tensor(w, 0, [3, 2], [1, 3])  # a transposed view
    sd["bn.bias"] = Tensor(h, 1, [2], [1])  # an offset view
    sd["bn.num_batches_tracked"] = Tensor(n, 0, [], [])
    return sd, [w, h, n]


def torch_pickle(obj, protocol=2):
    buf = io.BytesIO()
    TorchPickler(buf, protocol=protocol).dump(obj)
    return buf.getvalue()


def legacy_file():
    sd, storages = state_dict()
    out = io.BytesIO()
    for header in [0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}]:
        pickle.dump(header, out, protocol=2)
    out.write(torch_pickle(sd))
    pickle.dump([s.key for s in storages], out, protocol=2)
    for s in storages:
        out.write(struct.pack("<q", len(s.values)) + pack(s.kind, s.values))
    return out.getvalue()


def zip_file():
    sd, storages = state_dict()
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", torch_pickle(sd))
        for s in storages:
            z.writestr(f"archive/data/{s.key}", pack(s.kind, s.values))
        z.writestr("archive/version", "3\n")
    return out.getvalue()


# --- numpy arrays, pickled as numpy does: _reconstruct(ndarray, (0,), b'b') + setstate ----------
numpy = types.ModuleType("numpy")
numpy_core = types.ModuleType("numpy.core")
numpy_multiarray = types.ModuleType("numpy.core.multiarray")
sys.modules.update({"numpy": numpy, "numpy.core": numpy_core, "numpy.core.multiarray": numpy_multiarray})


def _reconstruct(*args):
    raise AssertionError


_reconstruct.__module__ = "numpy.core.multiarray"
numpy_multiarray._reconstruct = _reconstruct
ndarray = type("ndarray", (), {"__module__": "numpy"})
numpy.ndarray = ndarray


class dtype:
    def __init__(self, code, order):
        self.code, self.order = code, order

    def __reduce__(self):
        return (dtype_global, (self.code, False, True), (3, self.order, None, None, None, -1, -1, 0))


dtype_global = type("dtype", (), {"__module__": "numpy"})
numpy.dtype = dtype_global


class Array:
    def __init__(self, shape, code, order, data, fortran=False):
        self.shape, self.dt, self.data, self.fortran = shape, dtype(code, order), data, fortran

    def __reduce__(self):
        return (_reconstruct, (ndarray, (0,), b"b"), (1, tuple(self.shape), self.dt, self.fortran, self.data))


def numpy_file():
    d = {
        "Net_0": {
            "Conv_0": {
                "kernel": Array([1, 1, 2, 3], "f4", "<", struct.pack("<6f", 0, 1, 2, 3, 4, 5)),
                "bias": Array([3], "f4", ">", struct.pack(">3f", 1.5, -2.0, 0.25)),
            }
        },
        "f8": Array([2, 2], "f8", "<", struct.pack("<4d", 1, 2, 3, 4), fortran=True),
    }
    return pickle.dumps(d, protocol=3)


def main():
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fuzz", "corpus")
    seeds = {
        "torch_file/seed_legacy.pth": legacy_file(),
        "torch_file/seed_zip.pth": zip_file(),
        "numpy_pickle/seed_nested.ckpt": numpy_file(),
    }
    for rel, data in seeds.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        print(f"{rel}: {len(data)} bytes")


if __name__ == "__main__":
    main()
