"""PyTorch's CPU time on the hot shapes of tools/bench/shapes.txt, as `METRIC` lines in the
format of `cargo bench --bench shapes` (see there for the side-by-side command).

    python tools/bench/torch_shapes.py   # 2 threads (the machine's cores), f32, oneDNN/MKL
"""
import os
import time

import torch
import torch.nn.functional as F

torch.set_num_threads(int(os.environ.get("THREADS", os.cpu_count())))
here = os.path.dirname(os.path.abspath(__file__))
flt = os.environ.get("SHAPES_FILTER", "")


def median_ms(f):
    f()
    times, start = [], time.perf_counter()
    while len(times) < 5 or (time.perf_counter() - start < 2 and len(times) < 50):
        t = time.perf_counter()
        f()
        times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]


with torch.no_grad():
    for line in open(os.path.join(here, "shapes.txt")):
        line = line.strip()
        if not line or line.startswith("#") or flt not in line:
            continue
        kind, *v = line.split()
        v = [int(x) for x in v]
        if kind == "conv":
            n, c, h, w, co, k, s = v
            x, wt, b = torch.randn(n, c, h, w), torch.randn(co, c, k, k) * 0.05, torch.randn(co)
            y = F.conv2d(x, wt, b, stride=s, padding=k // 2)
            ms = median_ms(lambda: F.conv2d(x, wt, b, stride=s, padding=k // 2))
            name = f"conv_{n}x{c}x{h}x{w}_to{co}_k{k}s{s}"
            flops = 2 * n * c * co * k * k * y.shape[2] * y.shape[3]
        elif kind == "attn":
            b, h, lq, lk, d = v
            q, k_, v_ = torch.randn(b, h, lq, d), torch.randn(b, h, lk, d), torch.randn(b, h, lk, d)
            ms = median_ms(lambda: F.scaled_dot_product_attention(q, k_, v_))
            name, flops = f"attn_{b}x{h}x{lq}x{lk}x{d}", 4 * b * h * lq * lk * d
        else:
            m, k, n = v
            x, wt, b = torch.randn(m, k), torch.randn(n, k) * 0.05, torch.randn(n)
            ms = median_ms(lambda: F.linear(x, wt, b))
            name, flops = f"mm_{m}x{k}x{n}", 2 * m * k * n
        print(f"METRIC {name}_ms {ms:.3f}")
        print(f"METRIC {name}_GFLOPs {flops / ms / 1e6:.1f}")
