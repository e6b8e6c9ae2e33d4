#!/usr/bin/env bash
# lowtide vs diffusers on the SD1.5-architecture random model, interleaved through side_by_side.py:
# `generate` 256x256, 4 PNDM steps (5 UNet calls at batch 2), and VAE decode 512x512.
# Usage: python tools/fixtures/make_fixtures.py --sd15-random /tmp/sd15
#        PYTHON=/work/venv/bin/python tools/bench/sd.sh /tmp/sd15 [PAIRS]
set -euo pipefail
model=${1:?model folder}
pairs=${2:-3}
bin=${LOWTIDE:-target/release/lowtide}
py=${PYTHON:-python3}
here=$(cd "$(dirname "$0")" && pwd)
out=$(mktemp -d)
prompt="a photograph of an astronaut riding a horse"
find "$model" -name '*.safetensors' -exec cat {} + > /dev/null  # a warm page cache for both
"$py" "$here/side_by_side.py" --pairs "$pairs" --title "generate 256x256, 4 PNDM steps, fp32" \
    --a "lowtide=$bin generate --model $model --prompt '$prompt' --steps 4 --width 256 --height 256 --seed 0 --out $out/l.png --report $out/r.json" \
    --after-a "python3 $here/report_metrics.py $out/r.json" \
    --b "diffusers=$py $here/diffusers_generate.py $model --prompt '$prompt' --steps 4 --width 256 --height 256 --out $out/d.png"
"$py" -c "import torch; from safetensors.torch import save_file; torch.manual_seed(0); save_file({'z': torch.randn(1,4,64,64)}, '$out/z64.safetensors')"
"$py" "$here/side_by_side.py" --pairs "$pairs" --title "VAE decode 512x512, fp32" \
    --a "lowtide=$bin vae decode --model $model --latents $out/z64.safetensors --save-tensors $out/l.safetensors" \
    --b "diffusers=$py $here/diffusers_vae.py $model $out/z64.safetensors"
