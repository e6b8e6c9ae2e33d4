"""diffusers side of the Wan benchmark: WanPipeline on a folder (e.g. one written by
`make_fixtures.py --wan-random DIR`), printing load/generate times and peak memory.

    /usr/bin/time -v python tools/bench/diffusers_wan.py DIR --height 256 --width 256 --frames 17 --steps 2 --offload group

Every component is kept in the dtype its files have (UMT5-XXL bf16, transformer and VAE f32): the
UMT5 encoder upcast to f32 (19 GB) and the transformer (5.7 GB) do not fit in 24 GiB together.
diffusers offloads towards an accelerator; on a CPU-only machine the onload device is the CPU too,
and modes that refuse or fail are reported (not rerun without offloading: that is the `none` run).
"""

import argparse
import resource
import time

import torch
from diffusers import WanPipeline
from diffusers.hooks import apply_group_offloading


def offload(pipe, mode, device):
    cpu = torch.device("cpu")
    if mode == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif mode == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    elif mode == "group":
        kw = dict(onload_device=device, offload_device=cpu, offload_type="block_level", num_blocks_per_group=1,
                  use_stream=device.type == "cuda")
        pipe.transformer.enable_group_offload(**kw)
        apply_group_offloading(pipe.text_encoder, **kw)  # a transformers model: the hook function
        pipe.vae.to(device)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--prompt", default="a cat and a dog in a kitchen")
    ap.add_argument("--negative-prompt", default="blurry, static, low quality")
    ap.add_argument("--height", type=int, default=256)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--offload", default="none", choices=["none", "model", "sequential", "group"])
    a = ap.parse_args()
    device = torch.device(a.device)
    dtypes = {"text_encoder": torch.bfloat16, "default": torch.float32}

    def generate(pipe):
        g = torch.Generator("cpu").manual_seed(a.seed)
        t0 = time.perf_counter()
        with torch.no_grad():
            pipe(a.prompt, negative_prompt=a.negative_prompt, height=a.height, width=a.width, num_frames=a.frames,
                 num_inference_steps=a.steps, guidance_scale=a.guidance, generator=g, output_type="np")
        print(f"generate: {time.perf_counter() - t0:.2f} s ({a.steps} steps, {a.width}x{a.height}x{a.frames}, "
              f"{device}, offload={a.offload})")

    t0 = time.perf_counter()
    pipe = WanPipeline.from_pretrained(a.model, torch_dtype=dtypes)
    print(f"load: {time.perf_counter() - t0:.2f} s")
    if a.offload == "none":
        generate(pipe.to(device))
    else:
        try:
            offload(pipe, a.offload, device)
            print(f"offload={a.offload} on {device}: enabled")
            generate(pipe)
        except Exception as e:
            # Not rerun without offloading (that is the `none` row, and a run here is minutes).
            print(f"offload={a.offload} on {device}: failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
