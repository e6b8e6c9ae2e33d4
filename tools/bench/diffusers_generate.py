"""diffusers side of the benchmark: the same generation as `lowtide generate`, for timing and peak
RSS under `/usr/bin/time -v`.

    /usr/bin/time -v python tools/bench/diffusers_generate.py MODEL_DIR --width 256 --height 256 --steps 4

Prints `METRIC load_s` (from_pretrained) and `METRIC step_s` (median UNet call) for side_by_side.py.
"""

import argparse
import statistics
import time

import torch
from diffusers import StableDiffusionPipeline


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--prompt", default="a photograph of an astronaut riding a horse")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--height", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="diffusers.png")
    ap.add_argument("--scheduler", default=None, help="euler for EulerDiscreteScheduler")
    ap.add_argument("--offload", default="none", choices=["none", "model", "sequential", "group"])
    a = ap.parse_args()
    t0 = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(a.model, torch_dtype=torch.float32, safety_checker=None)
    print(f"METRIC load_s {time.perf_counter() - t0}")
    # One UNet call's wall time (what lowtide's --report gives per denoising step).
    calls, start = [], []
    pipe.unet.register_forward_pre_hook(lambda *_: start.append(time.perf_counter()))
    pipe.unet.register_forward_hook(lambda *_: calls.append(time.perf_counter() - start[-1]))
    if a.scheduler == "euler":
        from diffusers import EulerDiscreteScheduler

        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    # diffusers offloads only towards an accelerator; on a CPU-only machine these calls refuse or
    # do nothing useful, which is what the benchmark records.
    if a.offload == "model":
        pipe.enable_model_cpu_offload(device="cpu")
    elif a.offload == "sequential":
        pipe.enable_sequential_cpu_offload(device="cpu")
    elif a.offload == "group":
        pipe.unet.enable_group_offload(onload_device=torch.device("cpu"), offload_type="block_level",
                                       num_blocks_per_group=1)
    g = torch.Generator("cpu").manual_seed(a.seed)
    with torch.no_grad():
        img = pipe(a.prompt, num_inference_steps=a.steps, width=a.width, height=a.height, generator=g).images[0]
    img.save(a.out)
    print(f"METRIC step_s {statistics.median(calls)}")


if __name__ == "__main__":
    main()
