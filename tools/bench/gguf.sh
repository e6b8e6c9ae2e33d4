#!/usr/bin/env bash
# GGUF benchmark: one FLUX folder's transformer as f32 safetensors and as GGUF files written by
# `lowtide quantize`, under offload strategies, next to diffusers running the same GGUF
# (from_single_file + GGUFQuantizationConfig); interleaved rounds, wall time and peak RSS from
# /usr/bin/time -v.
#
# Usage: tools/bench/gguf.sh MODEL_DIR [SIZE] [STEPS] [ROUNDS] [TYPES...]
#   python tools/fixtures/make_fixtures.py --flux-random /tmp/flux-reduced --depth reduced  # 9.6 GB f32
#   tools/bench/gguf.sh /tmp/flux-reduced 256 1 2 q8_0 q4_k
# STRATEGIES (default "none group") picks lowtide's strategies; DIFFUSERS=0 skips diffusers.
set -euo pipefail
model=${1:?model folder}
size=${2:-256}
steps=${3:-1}
rounds=${4:-2}
shift $(( $# < 4 ? $# : 4 ))
types=("${@:-q8_0 q4_k}")
[ ${#types[@]} -eq 1 ] && read -r -a types <<< "${types[0]}"
read -r -a strategies <<< "${STRATEGIES:-none group}"
bin=${LOWTIDE:-target/release/lowtide}
py=${PYTHON:-python3}
here=$(cd "$(dirname "$0")" && pwd)
out=$(mktemp -d)
prompt="a photograph of an astronaut riding a horse"
for t in "${types[@]}"; do
    [ -f "$out/$t.gguf" ] || "$bin" quantize --model "$model" --component transformer --type "$t" -o "$out/$t.gguf"
done

source "$here/rows.sh"
header
for r in $(seq 1 "$rounds"); do
    for w in f32 "${types[@]}"; do
        weights=()
        [ "$w" != f32 ] && weights=(--weights "transformer=$out/$w.gguf")
        for s in "${strategies[@]}"; do
            lowtide_row "$w $s" "lt-$w-$s-$r" "$bin" generate --model "$model" --prompt "$prompt" \
                --steps "$steps" --width "$size" --height "$size" --seed 0 --guidance 0 \
                --offload "$s" "${weights[@]}" --out "$out/lt-$w-$s-$r.png"
        done
        [ "${DIFFUSERS:-1}" = 0 ] && continue
        gguf=()
        [ "$w" != f32 ] && gguf=(--gguf "$out/$w.gguf")
        diffusers_row "$w none" "df-$w-$r" "$py" "$here/diffusers_flux.py" "$model" --prompt "$prompt" \
            --steps "$steps" --height "$size" --width "$size" "${gguf[@]}" --out "$out/df-$w-$r.png"
    done
done
echo "logs in $out" >&2
