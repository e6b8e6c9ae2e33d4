#!/usr/bin/env bash
# FLUX benchmark: lowtide and diffusers side by side on one random-weight FLUX.1-schnell-sized
# folder, interleaved (lowtide, diffusers, lowtide, diffusers, ...) per offload strategy, wall
# time and peak RSS from /usr/bin/time -v, lowtide's --report (resident weights, stall/compute).
#
# Usage: tools/bench/flux.sh MODEL_DIR [SIZE] [STEPS] [REPEATS] [STRATEGIES...]
#   python tools/fixtures/make_fixtures.py --flux-random /tmp/flux-reduced --depth reduced  # 9.6 GB f32
#   tools/bench/flux.sh /tmp/flux-reduced 256 1 2 none model group sequential
#   python tools/fixtures/make_fixtures.py --flux-random /tmp/flux-full --depth full        # 34 GB bf16
#   DIFFUSERS=0 tools/bench/flux.sh /tmp/flux-full 256 1 1 group sequential
# DIFFUSERS=0 skips the diffusers runs; PYTHON picks the interpreter with diffusers installed.
set -euo pipefail
model=${1:?model folder}
size=${2:-256}
steps=${3:-1}
repeats=${4:-2}
shift $(( $# < 4 ? $# : 4 ))
strategies=("${@:-none model group sequential}")
[ ${#strategies[@]} -eq 1 ] && read -r -a strategies <<< "${strategies[0]}"
bin=${LOWTIDE:-target/release/lowtide}
py=${PYTHON:-python3}
here=$(cd "$(dirname "$0")" && pwd)
out=$(mktemp -d)
prompt="a photograph of an astronaut riding a horse"

source "$here/rows.sh"
header
for r in $(seq 1 "$repeats"); do
    for s in "${strategies[@]}"; do
        lowtide_row "$s" "lt-$s-$r" "$bin" generate --model "$model" --prompt "$prompt" --steps "$steps" \
            --width "$size" --height "$size" --seed 0 --guidance 0 --max-sequence-length 512 \
            --offload "$s" --out "$out/lt-$s-$r.png"
        [ "${DIFFUSERS:-1}" = 0 ] && continue
        diffusers_row "$s" "df-$s-$r" "$py" "$here/diffusers_flux.py" "$model" --prompt "$prompt" \
            --steps "$steps" --height "$size" --width "$size" --offload "$s" --out "$out/df-$s-$r.png"
    done
done
echo "logs in $out" >&2
