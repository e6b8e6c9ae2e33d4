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

field() { grep "$1" "$2" | awk '{print $NF}'; }
rss_mib() { field "Maximum resident set size" "$1" | awk '{printf "%.0f", $1/1024}'; }

printf "| run | strategy | wall | peak RSS MiB | resident weights MiB | stall s | compute s |\n|---|---|---|---|---|---|---|\n"
for r in $(seq 1 "$repeats"); do
    for s in "${strategies[@]}"; do
        tag="lt-$s-$r"
        if /usr/bin/time -v "$bin" generate --model "$model" --prompt "$prompt" --steps "$steps" \
            --width "$size" --height "$size" --seed 0 --guidance 0 --max-sequence-length 512 \
            --offload "$s" --out "$out/$tag.png" --report "$out/$tag.json" \
            > "$out/$tag.log" 2> "$out/$tag.time"; then
            read -r res stall comp < <(python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(round(r['peak_resident_bytes']/2**20), round(r['stall_seconds'],1), round(r['compute_seconds'],1))" "$out/$tag.json")
            printf "| lowtide | %s | %s | %s | %s | %s | %s |\n" "$s" "$(field 'Elapsed (wall clock)' "$out/$tag.time")" "$(rss_mib "$out/$tag.time")" "$res" "$stall" "$comp"
        else
            printf "| lowtide | %s | failed: %s | | | | |\n" "$s" "$(grep -m1 error: "$out/$tag.time" || tail -1 "$out/$tag.time")"
        fi
        [ "${DIFFUSERS:-1}" = 0 ] && continue
        tag="df-$s-$r"
        if /usr/bin/time -v "$py" "$here/diffusers_flux.py" "$model" --prompt "$prompt" --steps "$steps" \
            --height "$size" --width "$size" --offload "$s" --out "$out/$tag.png" \
            > "$out/$tag.log" 2> "$out/$tag.time"; then
            note=$(grep -m1 -i "offload" "$out/$tag.log" | cut -c1-60 || true)
            printf "| diffusers | %s | %s | %s | | | %s |\n" "$s" "$(field 'Elapsed (wall clock)' "$out/$tag.time")" "$(rss_mib "$out/$tag.time")" "$note"
        else
            printf "| diffusers | %s | failed (exit %s) | %s | | | |\n" "$s" "$(field 'Exit status' "$out/$tag.time")" "$(rss_mib "$out/$tag.time")"
        fi
    done
done
echo "logs in $out" >&2
