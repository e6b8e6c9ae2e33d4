#!/usr/bin/env bash
# Wall time and peak RSS of `lowtide generate` per offload strategy, measured by /usr/bin/time -v.
# Usage: tools/bench/offload.sh MODEL_DIR [SIZE] [STEPS]   (e.g. /tmp/sd15 128 2)
# The model comes from `python tools/fixtures/make_fixtures.py --sd15-random MODEL_DIR`.
set -euo pipefail
model=${1:?model folder}
size=${2:-128}
steps=${3:-2}
bin=${LOWTIDE:-target/release/lowtide}
out=$(mktemp -d)
# Warm the page cache so the first strategy measured does not pay for a cold disk.
find "$model" -name '*.safetensors' -exec cat {} + > /dev/null
printf "| strategy | wall s | peak RSS MiB | peak resident weights MiB |\n|---|---|---|---|\n"
for s in "none" "model" "group --no-prefetch" "group" "sequential"; do
    tag=${s// /_}
    # shellcheck disable=SC2086
    /usr/bin/time -v "$bin" generate --model "$model" --prompt "a photograph of an astronaut riding a horse" \
        --steps "$steps" --scheduler euler --width "$size" --height "$size" --seed 1 \
        --offload $s --out "$out/$tag.png" --report "$out/$tag.json" 2> "$out/$tag.time"
    wall=$(grep "Elapsed (wall clock)" "$out/$tag.time" | awk '{print $NF}')
    rss=$(grep "Maximum resident set size" "$out/$tag.time" | awk '{printf "%.0f", $NF/1024}')
    resident=$(python3 -c "import json,sys; print(round(json.load(open(sys.argv[1]))['peak_resident_bytes']/2**20))" "$out/$tag.json")
    printf "| %s | %s | %s | %s |\n" "$s" "$wall" "$rss" "$resident"
done
