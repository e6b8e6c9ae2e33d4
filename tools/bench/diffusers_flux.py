"""diffusers side of the FLUX benchmark: FluxPipeline on a folder (e.g. one written by
`make_fixtures.py --flux-random DIR`), printing wall times and peak memory.

    /usr/bin/time -v python tools/bench/diffusers_flux.py DIR --height 256 --width 256 --steps 1 --offload group

diffusers offloads towards an accelerator. On a CPU-only machine the onload device is the CPU too,
and some modes refuse (CPU -> CPU) or do nothing useful: the script prints what happened and
carries on without offloading rather than crashing.
"""

import argparse
import resource
import time

import torch
from diffusers import FluxPipeline
from diffusers.hooks import apply_group_offloading


def offload(pipe, mode, device, disk=None):
    cpu = torch.device("cpu")
    if mode == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif mode == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    elif mode == "group":
        kw = dict(onload_device=device, offload_device=cpu, offload_type="block_level", num_blocks_per_group=1,
                  use_stream=device.type == "cuda")
        if disk:
            # diffusers' answer for models larger than RAM: groups saved to disk and read back.
            kw.update(offload_to_disk_path=disk, low_cpu_mem_usage=True)
        pipe.transformer.enable_group_offload(**kw)
        apply_group_offloading(pipe.text_encoder_2, **kw)  # a transformers model: the hook function
        pipe.text_encoder.to(device)
        pipe.vae.to(device)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--prompt", default="a photograph of an astronaut riding a horse")
    ap.add_argument("--height", type=int, default=256)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--guidance", type=float, default=0.0, help="used only by guidance-distilled (dev) models")
    ap.add_argument("--max-sequence-length", type=int, default=512)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--offload", default="none", choices=["none", "model", "sequential", "group"])
    ap.add_argument("--out", default="diffusers_flux.png")
    ap.add_argument("--offload-to-disk", default=None, help="group offload: offload_to_disk_path")
    ap.add_argument("--gguf", default=None,
                    help="the transformer from this GGUF file (GGUFQuantizationConfig, computed in --dtype)")
    a = ap.parse_args()
    device = torch.device(a.device)
    dtype = torch.float32 if a.dtype == "fp32" else torch.bfloat16

    def load():
        t0 = time.perf_counter()
        extra = {}
        if a.gguf:
            from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig
            extra["transformer"] = FluxTransformer2DModel.from_single_file(
                a.gguf, quantization_config=GGUFQuantizationConfig(compute_dtype=dtype), config=a.model,
                subfolder="transformer", torch_dtype=dtype)
        pipe = FluxPipeline.from_pretrained(a.model, torch_dtype=dtype, **extra)
        print(f"load: {time.perf_counter() - t0:.2f} s")
        return pipe

    def generate(pipe):
        g = torch.Generator("cpu").manual_seed(a.seed)
        t0 = time.perf_counter()
        with torch.no_grad():
            img = pipe(a.prompt, height=a.height, width=a.width, num_inference_steps=a.steps, guidance_scale=a.guidance,
                       max_sequence_length=a.max_sequence_length, generator=g).images[0]
        print(f"generate: {time.perf_counter() - t0:.2f} s ({a.steps} steps, {a.width}x{a.height}, {a.dtype}, {device}, "
              f"offload={a.offload})")
        img.save(a.out)

    pipe = load()
    if a.offload == "none":
        generate(pipe.to(device))
    else:
        # On a CPU-only machine diffusers/accelerate may refuse CPU -> CPU offloading, or accept it and fail
        # in the first forward: report it and run once more without offloading.
        try:
            offload(pipe, a.offload, device, a.offload_to_disk)
            print(f"offload={a.offload} on {device}: enabled")
            generate(pipe)
        except Exception as e:
            print(f"offload={a.offload} on {device}: failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
            a.offload = "none (fallback)"
            del pipe
            generate(load().to(device))
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    if device.type == "cuda":
        print(f"peak CUDA memory: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
