"""PyTorch side of the FLUX block benchmark: a FluxTransformer2DModel at full width (24 heads of
128, FLUX.1's real dims) cut to one double-stream block, random weights, fp32, forward at 1024
image tokens (a 512x512 image) and 512 text tokens. Prints METRIC lines for side_by_side.py;
lowtide's side is benches/flux_block.rs on the same folder.

    python tools/bench/flux_block.py --write /tmp/flux1block
    python tools/bench/flux_block.py /tmp/flux1block [--matmul-precision medium]
"""

import argparse
import statistics
import time

import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import save_file


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--bf16", action="store_true", help="with --write: store the weights in bf16, "
                    "as FLUX.1 is published (both sides compute in f32)")
    ap.add_argument("--runs", type=int, default=5)
    # torch.set_float32_matmul_precision: on the CPU "high" is plain f32 like "highest" (torch
    # 2.15), "medium" one bf16 pass through oneDNN (AMX where present).
    ap.add_argument("--matmul-precision", default="highest", choices=["highest", "high", "medium"])
    ap.add_argument("--compare", nargs="*", help="outputs (safetensors, tensor `out`) to measure "
                    "against a float64 run; `torch-<precision>` for PyTorch's own")
    a = ap.parse_args()
    torch.set_num_threads(2)
    torch.set_float32_matmul_precision(a.matmul_precision)
    if a.write:
        torch.manual_seed(0)
        m = FluxTransformer2DModel(num_layers=1, num_single_layers=0, guidance_embeds=False)
        with torch.no_grad():
            for p in m.parameters():
                p.normal_(0, 0.02)
        m.to(torch.bfloat16 if a.bf16 else torch.float32).save_pretrained(f"{a.dir}/transformer")
        ids = torch.zeros(1024, 3)
        ids[:, 1] = torch.arange(32).repeat_interleave(32)
        ids[:, 2] = torch.arange(32).repeat(32)
        save_file(
            {
                "hidden_states": torch.randn(1, 1024, 64),
                "encoder_hidden_states": torch.randn(1, 512, 4096),
                "pooled_projections": torch.randn(1, 768),
                "timestep": torch.tensor([0.5]),
                "img_ids": ids,
                "txt_ids": torch.zeros(512, 3),
            },
            f"{a.dir}/inputs.safetensors",
        )
        print(f"wrote {a.dir}")
        return
    from safetensors.torch import load_file

    m = FluxTransformer2DModel.from_pretrained(f"{a.dir}/transformer", torch_dtype=torch.float32).eval()
    x = load_file(f"{a.dir}/inputs.safetensors")
    if a.compare is not None:
        return compare(m, x, a.compare)
    times = []
    with torch.no_grad():
        for i in range(a.runs + 1):
            t = time.perf_counter()
            m(
                hidden_states=x["hidden_states"],
                encoder_hidden_states=x["encoder_hidden_states"],
                pooled_projections=x["pooled_projections"],
                timestep=x["timestep"],
                img_ids=x["img_ids"],
                txt_ids=x["txt_ids"],
            )
            if i > 0:  # the first call warms up
                times.append(time.perf_counter() - t)
    print(f"METRIC flux_1block_ms {statistics.median(times) * 1e3:.1f}")


def forward(m, x):
    with torch.no_grad():
        return m(hidden_states=x["hidden_states"], encoder_hidden_states=x["encoder_hidden_states"],
                 pooled_projections=x["pooled_projections"], timestep=x["timestep"],
                 img_ids=x["img_ids"], txt_ids=x["txt_ids"]).sample


def compare(m, x, outputs):
    """Max and RMS error of each output relative to the float64 forward's RMS."""
    from safetensors.torch import load_file

    ref = forward(m.double(), {k: v.double() for k, v in x.items()}).flatten()
    m.float()
    rms = ref.pow(2).mean().sqrt()
    for o in outputs:
        if o.startswith("torch-"):
            torch.set_float32_matmul_precision(o[6:])
            y = forward(m, x)
        else:
            y = load_file(o)["out"]
        d = (y.double().flatten() - ref)
        print(f"{o}: max |err| {(d.abs().max() / rms).item():.2e}, rms err {(d.pow(2).mean().sqrt() / rms).item():.2e} (of the output's rms)")


if __name__ == "__main__":
    main()
