#!/usr/bin/env bash
# Wan VAE decode benchmark: lowtide (untiled, --tiling, --decode-chunk-size 4) and diffusers
# (untiled, tiled), interleaved, wall time and peak RSS from /usr/bin/time -v.
# Usage: python tools/bench/diffusers_wan_vae.py --write /tmp/wanvae --frames 21 --height 60 --width 104
#        PYTHON=.venv/bin/python tools/bench/wan_vae.sh /tmp/wanvae [REPEATS]
set -euo pipefail
dir=${1:?folder written by diffusers_wan_vae.py --write}
repeats=${2:-1}
bin=${LOWTIDE:-target/release/lowtide}
py=${PYTHON:-python3}
here=$(cd "$(dirname "$0")" && pwd)
out=$(mktemp -d)
field() { grep "$1" "$2" | awk '{print $NF}'; }
row() { printf "| %s | %s | %s |\n" "$1" "$(field 'Elapsed (wall clock)' "$2")" "$(field 'Maximum resident set size' "$2" | awk '{printf "%.0f", $1/1024}')"; }
printf "| run | wall | peak RSS MiB |\n|---|---|---|\n"
for r in $(seq 1 "$repeats"); do
    for mode in "" "--tiling" "--decode-chunk-size 4"; do
        # shellcheck disable=SC2086
        /usr/bin/time -v "$bin" vae decode --model "$dir" --latents "$dir/z.safetensors" \
            --save-tensors "$out/l.safetensors" $mode > /dev/null 2> "$out/t"
        row "lowtide ${mode:-untiled}" "$out/t"
        case "$mode" in --decode*) continue ;; esac
        # shellcheck disable=SC2086
        /usr/bin/time -v "$py" "$here/diffusers_wan_vae.py" "$dir" $mode > /dev/null 2> "$out/t"
        row "diffusers ${mode:-untiled}" "$out/t"
    done
done
