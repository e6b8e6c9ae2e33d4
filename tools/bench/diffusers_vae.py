"""diffusers side of the VAE decode benchmark: AutoencoderKL.decode of latents (B, 4, h, w) from a
safetensors file (key `z`), as `lowtide vae decode --latents FILE` does (no scaling).

    /usr/bin/time -v python tools/bench/diffusers_vae.py MODEL_DIR z.safetensors [--tiling]
"""

import argparse
import time

import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("latents")
    ap.add_argument("--tiling", action="store_true")
    a = ap.parse_args()
    vae = AutoencoderKL.from_pretrained(a.model, subfolder="vae", torch_dtype=torch.float32)
    if a.tiling:
        vae.enable_tiling()
    z = load_file(a.latents)["z"]
    t0 = time.perf_counter()
    with torch.no_grad():
        x = vae.decode(z).sample
    print(f"METRIC decode_s {time.perf_counter() - t0}")
    print(tuple(x.shape))


if __name__ == "__main__":
    main()
