"""diffusers side of the Wan VAE benchmark: a random-weight AutoencoderKLWan with the real
Wan 2.1 config, decoding latents (1, 16, T, h, w) as WanPipeline does (one latent frame at a time),
optionally tiled. Also writes the model and the latents for lowtide (--write DIR).

    python tools/bench/diffusers_wan_vae.py --write /tmp/wanvae --frames 21 --height 60 --width 104
    /usr/bin/time -v python tools/bench/diffusers_wan_vae.py /tmp/wanvae [--tiling]
"""

import argparse
import resource
import time

import torch
from diffusers import AutoencoderKLWan
from safetensors.torch import load_file, save_file


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir", nargs="?")
    ap.add_argument("--write", help="write a random Wan 2.1 VAE (diffusers' default config = Wan 2.1's) and latents here")
    ap.add_argument("--frames", type=int, default=21)
    ap.add_argument("--height", type=int, default=60)
    ap.add_argument("--width", type=int, default=104)
    ap.add_argument("--tiling", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(2)
    if a.write:
        torch.manual_seed(0)
        vae = AutoencoderKLWan()  # diffusers' defaults are the Wan 2.1 VAE config
        with torch.no_grad():
            for p in vae.parameters():
                p.normal_(0, 0.02)
        vae.save_pretrained(f"{a.write}/vae")
        z = torch.randn(1, 16, a.frames, a.height, a.width)
        save_file({"z": z}, f"{a.write}/z.safetensors")
        print(f"wrote {a.write}/vae and z {tuple(z.shape)}")
        return
    vae = AutoencoderKLWan.from_pretrained(f"{a.dir}/vae", torch_dtype=torch.float32)
    if a.tiling:
        vae.enable_tiling()
    z = load_file(f"{a.dir}/z.safetensors")["z"]
    t0 = time.perf_counter()
    with torch.no_grad():
        x = vae.decode(z).sample
    print(f"decode {tuple(z.shape)} -> {tuple(x.shape)}: {time.perf_counter() - t0:.1f} s, tiling={a.tiling}")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
