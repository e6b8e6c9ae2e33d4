# Shared by the per-strategy benchmarks (flux.sh, wan.sh): each function runs one command under
# /usr/bin/time -v, logs into $out/TAG.*, and prints one row of the table `header` starts.
# Usage: source "$here/rows.sh"; header; lowtide_row STRATEGY TAG CMD...; diffusers_row STRATEGY TAG CMD...

field() { grep "$1" "$2" | awk '{print $NF}'; }
rss_mib() { field "Maximum resident set size" "$1" | awk '{printf "%.0f", $1/1024}'; }

header() {
    printf "| run | strategy | wall | peak RSS MiB | resident weights MiB | stall s | compute s |\n|---|---|---|---|---|---|---|\n"
}

# CMD gets `--report $out/TAG.json` appended: resident weights, stall and compute come from it.
lowtide_row() {
    local s=$1 tag=$2 res stall comp
    shift 2
    if /usr/bin/time -v "$@" --report "$out/$tag.json" > "$out/$tag.log" 2> "$out/$tag.time"; then
        read -r res stall comp < <(python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(round(r['peak_resident_bytes']/2**20), round(r['stall_seconds'],1), round(r['compute_seconds'],1))" "$out/$tag.json")
        printf "| lowtide | %s | %s | %s | %s | %s | %s |\n" "$s" "$(field 'Elapsed (wall clock)' "$out/$tag.time")" "$(rss_mib "$out/$tag.time")" "$res" "$stall" "$comp"
    else
        printf "| lowtide | %s | failed: %s | | | | |\n" "$s" "$(grep -m1 error: "$out/$tag.time" || tail -1 "$out/$tag.time")"
    fi
}

# The diffusers scripts print what became of the offload request; the row quotes it.
diffusers_row() {
    local s=$1 tag=$2 note
    shift 2
    if /usr/bin/time -v "$@" > "$out/$tag.log" 2> "$out/$tag.time"; then
        note=$(grep -m1 -i "offload" "$out/$tag.log" | cut -c1-60 || true)
        printf "| diffusers | %s | %s | %s | | | %s |\n" "$s" "$(field 'Elapsed (wall clock)' "$out/$tag.time")" "$(rss_mib "$out/$tag.time")" "$note"
    else
        printf "| diffusers | %s | failed (exit %s) | %s | | | |\n" "$s" "$(field 'Exit status' "$out/$tag.time")" "$(rss_mib "$out/$tag.time")"
    fi
}
