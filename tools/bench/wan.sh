#!/usr/bin/env bash
# Wan benchmark: lowtide and diffusers side by side on one random-weight Wan2.1-T2V-1.3B-sized
# folder, interleaved per offload strategy (lowtide, diffusers, ...), wall time and peak RSS from
# /usr/bin/time -v, lowtide's --report (resident weights, stall/compute).
#
# Usage: tools/bench/wan.sh MODEL_DIR [REPEATS] [STRATEGIES...]
#   python tools/fixtures/make_fixtures.py --wan-random /tmp/wan13   # 17.6 GB: UMT5-XXL bf16, rest f32
#   PYTHON=/work/venv/bin/python tools/bench/wan.sh /tmp/wan13 1 none model group sequential
# Work: 256x256, 17 frames, 2 UniPC steps, guidance 5 (transformer batch 2). lowtide keeps UMT5's
# bf16 weights as stored (--storage-dtype text_encoder=auto; results equal to upcasting at load);
# diffusers loads them in bf16 too (f32 would not fit next to the transformer). SIZE, FRAMES, STEPS
# override the work; DIFFUSERS=0 skips diffusers.
set -euo pipefail
model=${1:?model folder}
repeats=${2:-1}
shift $(( $# < 2 ? $# : 2 ))
strategies=("${@:-none model group sequential}")
[ ${#strategies[@]} -eq 1 ] && read -r -a strategies <<< "${strategies[0]}"
size=${SIZE:-256}; frames=${FRAMES:-17}; steps=${STEPS:-2}
bin=${LOWTIDE:-target/release/lowtide}
py=${PYTHON:-python3}
here=$(cd "$(dirname "$0")" && pwd)
out=$(mktemp -d)
prompt="a cat and a dog in a kitchen"
negative="blurry, static, low quality"

source "$here/rows.sh"
header
for r in $(seq 1 "$repeats"); do
    for s in "${strategies[@]}"; do
        lowtide_row "$s" "lt-$s-$r" "$bin" generate --model "$model" --prompt "$prompt" \
            --negative-prompt "$negative" --steps "$steps" --frames "$frames" --width "$size" \
            --height "$size" --seed 0 --storage-dtype text_encoder=auto --offload "$s" \
            --out "$out/lt-$s-$r.mp4"
        [ "${DIFFUSERS:-1}" = 0 ] && continue
        diffusers_row "$s" "df-$s-$r" "$py" "$here/diffusers_wan.py" "$model" --prompt "$prompt" \
            --negative-prompt "$negative" --steps "$steps" --frames "$frames" --height "$size" \
            --width "$size" --offload "$s"
    done
done
echo "logs in $out" >&2
