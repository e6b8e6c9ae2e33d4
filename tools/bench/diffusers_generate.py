"""diffusers side of the benchmark: the same generation as `lowtide generate`, for timing and peak
RSS under `/usr/bin/time -v`.

    /usr/bin/time -v python tools/bench/diffusers_generate.py MODEL_DIR --width 256 --height 256 --steps 4
"""

import argparse

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
    a = ap.parse_args()
    pipe = StableDiffusionPipeline.from_pretrained(a.model, torch_dtype=torch.float32, safety_checker=None)
    g = torch.Generator("cpu").manual_seed(a.seed)
    with torch.no_grad():
        img = pipe(a.prompt, num_inference_steps=a.steps, width=a.width, height=a.height, generator=g).images[0]
    img.save(a.out)


if __name__ == "__main__":
    main()
