"""PyTorch's CPU conv2d on the shapes of `cargo bench --bench conv2d`, for the README table.

    python tools/bench/torch_conv.py   # median of 5 runs, 2 threads, f32
"""
import time

import torch
import torch.nn.functional as F

torch.set_num_threads(2)
for ch, hw, stride in [(320, 64, 1), (128, 512, 1), (128, 512, 2)]:
    x = torch.randn(1, ch, hw, hw)
    conv = torch.nn.Conv2d(ch, ch, 3, stride=stride, padding=1 if stride == 1 else 0)

    def run():
        # The VAE's downsampler pads right/bottom by one, then convolves with stride 2.
        return conv(x) if stride == 1 else conv(F.pad(x, (0, 1, 0, 1)))

    with torch.no_grad():
        for _ in range(2):
            run()
        times = []
        for _ in range(5):
            t = time.perf_counter()
            run()
            times.append(time.perf_counter() - t)
    print(f"conv3x3 s{stride} {ch}ch {hw}px: {sorted(times)[2] * 1e3:.1f} ms")
