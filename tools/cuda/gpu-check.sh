#!/usr/bin/env bash
# The GPU check: runs a prebuilt CUDA lowtide on every committed tiny pipeline and checks it.
# Needs the NVIDIA driver and the CUDA 13 libraries; no Rust toolchain, no network.
#
# Usage: tools/cuda/gpu-check.sh [BINARY] [--device cuda|cuda:N|cpu] [--medium SD15_DIR]
#                                [--steps N] [--size PX] [--keep DIR]
#   BINARY      the lowtide built by tools/cuda/build.sh (or $LOWTIDE; default
#               target/release/lowtide)
#   --device    the device under test (default cuda). `--device cpu` is a dry run of the
#               plumbing on a machine without a GPU (every "GPU" run is then a CPU run).
#   --medium    a folder with the SD1.5-architecture model (tools/fixtures/make_fixtures.py
#               --sd15-random DIR): also print the offload table on it (--size, default 512;
#               --steps, default 10).
#   --keep      keep the outputs (tensors, reports, logs) in DIR instead of a temporary folder.
# Environment:
#   CUDA_LIBS          extra folders holding libcudart.so.13, libcublas.so.13, libcublasLt.so.13,
#                      libcurand.so.10, libnvrtc.so.13 (colon-separated), searched first.
#   PYTHON             interpreters whose site-packages may hold NVIDIA's wheels (PyTorch's
#                      nvidia/cu13/lib) and that runs the comparisons (default: python3).
#   GPU_CHECK_TOL      tolerance of GPU against CPU, relative to the CPU tensor's largest
#                      magnitude (default 1e-3, for f32; see the README).
#   FIXTURES           the tiny pipelines (default: tests/fixtures next to this script).
#
# What it checks, per tiny pipeline (tiny-sd15, tiny-sd2, tiny-flux-dev, tiny-flux-schnell,
# tiny-wan21, tiny-wan22-ti2v, tiny-wan22-a14b):
#   1. `generate --device cuda --save-tensors` against the same run with `--device cpu`: every
#      tensor (prompt embeddings, final latents, image or video) within GPU_CHECK_TOL;
#   2. `--offload model|group|sequential` (and group without prefetch, and group without the
#      pinned host tier: --pin-memory off) on the GPU are bit-identical to `--offload none` on
#      the GPU, and group offload's report shows its weights came through pinned host memory;
# and the same for a few variants: VAE tiling (--tile-size 32) on SD 1.5 and Wan 2.1, weight
# storage in bf16 (SD 2), f8e4m3 (FLUX dev) and f8e5m2 (Wan 2.1).
# Exit status 0 only when every check passed. The summary table goes to stdout.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)

bin=${LOWTIDE:-}
device=cuda
medium=
steps=10
size=512
keep=
while [ $# -gt 0 ]; do
    case $1 in
        --device) device=$2; shift 2 ;;
        --medium) medium=$2; shift 2 ;;
        --steps) steps=$2; shift 2 ;;
        --size) size=$2; shift 2 ;;
        --keep) keep=$2; shift 2 ;;
        -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        -*) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
        *) bin=$1; shift ;;
    esac
done
bin=${bin:-$root/target/release/lowtide}
fixtures=${FIXTURES:-$root/tests/fixtures}
tol=${GPU_CHECK_TOL:-1e-3}
read -r -a pythons <<< "${PYTHON:-python3}"
dry=0
[ "$device" = cpu ] && dry=1

say() { echo "gpu-check: $*" >&2; }
die() { echo "gpu-check: error: $*" >&2; exit 1; }
[ -x "$bin" ] || die "no lowtide binary at $bin (give its path as the first argument or \$LOWTIDE)"
bin=$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")
[ -d "$fixtures/tiny-sd15" ] || die "no tiny pipelines in $fixtures (set FIXTURES)"
if [ -n "$keep" ]; then
    mkdir -p "$keep" && work=$(cd "$keep" && pwd)
else
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
fi

# ---------------------------------------------------------------------------------------------
# Run-time libraries. The binary records sonames only (no run path): the driver's libcuda.so.1
# comes from the system; the CUDA 13 libraries come from $CUDA_LIBS, a PyTorch (or any pip)
# environment's site-packages/nvidia/cu13/lib (CUDA 13 wheels put every library there),
# a CUDA toolkit, or the system's library path.
# ---------------------------------------------------------------------------------------------
python=
for p in "${pythons[@]}"; do
    if command -v "$p" >/dev/null; then python=$p; break; fi
done
needed() { # the binary's DT_NEEDED entries
    if command -v readelf >/dev/null; then
        readelf -d "$bin" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p'
    elif command -v objdump >/dev/null; then
        objdump -p "$bin" | awk '$1 == "NEEDED" {print $2}'
    else
        printf '%s\n' libcuda.so.1 libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13
    fi
}
candidate_dirs() {
    local p d
    [ -n "${CUDA_LIBS:-}" ] && tr ':' '\n' <<< "$CUDA_LIBS"
    for p in "${pythons[@]}"; do
        command -v "$p" >/dev/null || continue
        "$p" - <<'EOF' 2>/dev/null
import glob, os, site, sys, sysconfig
roots = set(site.getsitepackages() + [site.getusersitepackages(), sysconfig.get_paths()["purelib"]])
for r in sorted(roots):
    for d in sorted(glob.glob(os.path.join(r, "nvidia", "cu*", "lib")) + glob.glob(os.path.join(r, "nvidia", "*", "lib"))):
        print(d)
EOF
    done
    for d in "${CUDA_HOME:-/usr/local/cuda}"/lib64 "${CUDA_HOME:-/usr/local/cuda}"/lib /usr/local/cuda-13*/lib64; do
        [ -d "$d" ] && echo "$d"
    done
}
if [ $dry = 0 ]; then
    mapfile -t dirs < <(candidate_dirs | awk '!seen[$0]++')
    libpath=
    missing=()
    for so in $(needed); do
        case $so in lib*cuda*|libcublas*|libcurand*|libnvrtc*) ;; *) continue ;; esac
        found=
        for d in "${dirs[@]}"; do
            case $d in */stubs|*/stubs/) continue ;; esac # link-time stand-ins never run
            if [ -e "$d/$so" ]; then found=$d; break; fi
        done
        if [ -n "$found" ]; then
            case ":$libpath:" in *":$found:"*) ;; *) libpath=${libpath:+$libpath:}$found ;; esac
        elif [ "$so" != libcuda.so.1 ] && ! ldconfig -p 2>/dev/null | grep -q " $so "; then
            missing+=("$so")
        fi
    done
    [ ${#missing[@]} -eq 0 ] || die "cannot find ${missing[*]}: install the CUDA 13 libraries (e.g. a PyTorch cu13x environment, or pip install nvidia-cublas nvidia-curand nvidia-cuda-nvrtc nvidia-cuda-runtime, CUDA 13 versions) and point CUDA_LIBS or PYTHON at them"
    export LD_LIBRARY_PATH=$libpath${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    say "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    if command -v ldd >/dev/null; then
        if ldd "$bin" | grep -q "not found"; then
            ldd "$bin" | grep "not found" >&2
            die "libraries missing at run time (libcuda.so.1 comes with the NVIDIA driver)"
        fi
        if ldd "$bin" | grep -q "/stubs/"; then
            die "a link-time stand-in from lib/stubs would be loaded: $(ldd "$bin" | grep /stubs/)"
        fi
        ldd "$bin" | grep -E "libcuda|libcudart|libcublas|libcurand|libnvrtc" | sed 's/^[[:space:]]*/  /' >&2
    fi
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=index,name,driver_version,compute_cap,memory.total --format=csv >&2 || true
        nvidia-smi 2>/dev/null | grep -o "CUDA Version: [0-9.]*" | sed 's/^/  driver supports /' >&2 || true
    else
        say "nvidia-smi not found: no GPU information and no device-memory figures"
    fi
else
    say "dry run: --device cpu stands in for the GPU (checks the plumbing only)"
fi
[ -n "$python" ] || say "no python3: tensors are compared for bit-identity only (cmp), the GPU-vs-CPU tolerance check is skipped"

# ---------------------------------------------------------------------------------------------
# The tiny pipelines: CLI flags per family (small sizes and few steps, as the tests use).
# ---------------------------------------------------------------------------------------------
family_args() { # fixture dir -> generate arguments (without --device/--offload/outputs)
    local class
    class=$(sed -n 's/.*"_class_name"[[:space:]]*:[[:space:]]*"\([A-Za-z0-9]*\)".*/\1/p' "$1/model_index.json" | head -n1)
    case $class in
        StableDiffusionPipeline)
            echo "--prompt astronaut --negative-prompt blurry --steps 4 --guidance 7.5 --seed 100 --width 48 --height 64 --out OUT.png" ;;
        FluxPipeline)
            echo "--prompt astronaut --steps 3 --seed 1042 --width 48 --height 64 --max-sequence-length 16 --out OUT.png" ;;
        WanPipeline)
            echo "--prompt cat --negative-prompt blurry --frames 9 --steps 4 --seed 42 --width 64 --height 64 --max-sequence-length 16 --out OUT.mp4" ;;
        *) return 1 ;;
    esac
}

# Each fixture as is, then a few with low-precision weight storage (candle's bf16 and fp8 casts,
# lowtide's e5m2 table) and VAE tiling, which take other code paths on the GPU.
cases=()
for dir in "$fixtures"/tiny-*; do
    name=$(basename "$dir")
    if family_args "$dir" >/dev/null; then cases+=("$name"); else say "skipping $name (unknown pipeline class)"; fi
done
for extra in "tiny-sd15 --tile-size 32" "tiny-sd2 --storage-dtype bf16" \
    "tiny-flux-dev --storage-dtype f8e4m3" "tiny-wan21 --storage-dtype f8e5m2" "tiny-wan21 --tile-size 32"; do
    [ -d "$fixtures/${extra%% *}" ] && cases+=("$extra")
done

fails=0
rows=()
run() { # case-tag fixture ref|dut offload [flags...] -> $work/tag.{ref,dut}.offload.{safetensors,json,log}
    local tag=$1.$3.$4 name=$2 dev=$gpu off=$4 args ext
    [ "$3" = ref ] && dev=cpu
    case $off in group-np|group-up) off=group ;; esac
    shift 4
    args=$(family_args "$fixtures/$name") || return 2
    ext=${args##*OUT.}
    # shellcheck disable=SC2086 # the family's arguments are one word each
    "$bin" generate --model "$fixtures/$name" ${args/OUT.$ext/$work/$tag.$ext} --device "$dev" \
        --offload "$off" "$@" --save-tensors "$work/$tag.safetensors" --report "$work/$tag.json" \
        > "$work/$tag.log" 2>&1
}
compare() { # ref cand tol -> 0 if within tolerance (tol 0: bit-identical)
    if [ -n "$python" ]; then
        "$python" "$here/compare.py" "$1" "$2" "$3" >> "$work/compare.log" 2>&1
    elif [ "$3" = 0 ]; then
        cmp -s "$1" "$2"
    else
        return 3
    fi
}
max_rel() { # the largest relative difference compare.py printed last
    [ -n "$python" ] || { echo "n/a"; return; }
    awk '/^== / {n = 0} / = [0-9.e+-]* \(/ {v[n++] = $0} END {for (i = 0; i < n; i++) print v[i]}' "$work/compare.log" |
        sed -n 's/.* = \([0-9.e+-]*\) (.*/\1/p' | sort -g | tail -n1
}

gpu=$device
for c in "${cases[@]}"; do
    read -r -a words <<< "$c"
    name=${words[0]}
    flags=("${words[@]:1}")
    tag=$(echo "$c" | tr -c 'A-Za-z0-9\n-' '_')
    say "$c"
    row="| $c |"
    if ! run "$tag" "$name" ref none "${flags[@]}"; then
        tail -n 5 "$work/$tag.ref.none.log" >&2
        rows+=("$row CPU run failed | | | | |"); fails=$((fails + 1)); continue
    fi
    if ! run "$tag" "$name" dut none "${flags[@]}"; then
        tail -n 5 "$work/$tag.dut.none.log" >&2
        grep -qi "ptx" "$work/$tag.dut.none.log" &&
            say "a PTX error means the driver is older than the toolkit the binary was built with: rebuild with CUDA_TOOLKIT_VERSION matching the driver's CUDA version"
        rows+=("$row GPU run failed | | | | |"); fails=$((fails + 1)); continue
    fi
    echo "== $c: $gpu vs cpu" >> "$work/compare.log"
    compare "$work/$tag.ref.none.safetensors" "$work/$tag.dut.none.safetensors" "$tol"
    case $? in
        0) row="$row ok ($(max_rel)) |" ;;
        3) row="$row skipped (no python3) |" ;;
        *) row="$row FAIL ($(max_rel)) |"; fails=$((fails + 1)) ;;
    esac
    for off in model group sequential group-np group-up; do
        extra=("${flags[@]}")
        [ $off = group-np ] && extra+=(--no-prefetch)
        [ $off = group-up ] && extra+=(--pin-memory off)
        if ! run "$tag" "$name" dut $off "${extra[@]}"; then
            tail -n 5 "$work/$tag.dut.$off.log" >&2
            row="$row run failed |"; fails=$((fails + 1)); continue
        fi
        echo "== $c: $gpu $off vs none" >> "$work/compare.log"
        pinned=$(sed -n 's/.*"peak_pinned_host_bytes": *\([0-9]*\).*/\1/p' "$work/$tag.dut.$off.json" | head -n1)
        if ! compare "$work/$tag.dut.none.safetensors" "$work/$tag.dut.$off.safetensors" 0; then
            row="$row DIFFERENT |"; fails=$((fails + 1))
        elif [ $dry = 0 ] && [ $off = group ] && [ "${pinned:-0}" = 0 ]; then
            # On a GPU, offloaded weights must come through the host tier (--pin-memory auto).
            row="$row identical, but nothing pinned |"; fails=$((fails + 1))
        elif [ $off = group ]; then
            row="$row identical (pinned $(awk "BEGIN {printf \"%.1f\", ${pinned:-0} / 1048576}") MiB) |"
        else
            row="$row identical |"
        fi
    done
    rows+=("$row")
done

echo
echo "lowtide $("$bin" --version 2>/dev/null | awk '{print $2}') on $gpu; GPU vs CPU: max|gpu - cpu| / max|cpu| over the saved tensors (tolerance $tol); offload vs none on $gpu: bit-identity"
echo
echo "| pipeline, flags | $gpu vs cpu | model | group | sequential | group, no prefetch | group, --pin-memory off |"
echo "|---|---|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"
[ -n "$keep" ] && echo && echo "outputs, logs and compare.log in $work"

# ---------------------------------------------------------------------------------------------
# The offload table on the SD1.5-architecture model.
# ---------------------------------------------------------------------------------------------
if [ -n "$medium" ]; then
    [ -f "$medium/model_index.json" ] || die "--medium $medium has no model_index.json"
    timer=
    [ -x /usr/bin/time ] && /usr/bin/time -v true 2>/dev/null && timer=/usr/bin/time
    [ -n "$timer" ] || say "no GNU /usr/bin/time: no host RSS figures"
    gpu_index=${gpu#cuda}; gpu_index=${gpu_index#:}; gpu_index=${gpu_index:-0}
    smi=0
    [ $dry = 0 ] && command -v nvidia-smi >/dev/null && smi=1
    used_mib() { nvidia-smi --id="$gpu_index" --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | head -n1; }
    echo
    echo "Offload on $(basename "$medium") ($size x $size, $steps steps, f32, $gpu):"
    echo
    echo "| strategy | wall s (--report) | vs none | process wall s | peak device MiB (nvidia-smi, above idle) | peak of the device's memory pool MiB (--report) | peak resident weights MiB (--report) | % of none's | peak host RSS MiB | pinned host MiB (--report) |"
    echo "|---|---|---|---|---|---|---|---|---|---|"
    json_num() { sed -n "s/.*\"$1\": *\([0-9.e+-]*\).*/\1/p" "$2" | head -n1; }
    base_wall=
    base_res=
    # A first run fills the driver's PTX JIT cache, so that no row pays for compiling kernels.
    say "warm-up run on $(basename "$medium")"
    "$bin" generate --model "$medium" --prompt "warm-up" --steps 1 --width "$size" --height "$size" \
        --device "$gpu" --out "$work/medium.warmup.png" > "$work/medium.warmup.log" 2>&1 ||
        { tail -n 5 "$work/medium.warmup.log" >&2; die "the warm-up run on $medium failed"; }
    for s in none model "group --blocks-per-group 1" "group --blocks-per-group 1 --no-prefetch" \
        "group --blocks-per-group 1 --pin-memory off" sequential; do
        tag=medium.$(echo "$s" | tr -c 'a-z0-9\n' '-')
        read -r -a sargs <<< "--offload $s"
        idle=0
        [ $smi = 1 ] && idle=$(used_mib)
        cmd=("$bin" generate --model "$medium" --prompt "a lighthouse at dawn" --steps "$steps"
            --width "$size" --height "$size" --seed 1 --device "$gpu" "${sargs[@]}"
            --out "$work/$tag.png" --report "$work/$tag.json")
        start=$(date +%s%N)
        if [ -n "$timer" ]; then
            "$timer" -v -o "$work/$tag.time" "${cmd[@]}" > "$work/$tag.log" 2>&1 &
        else
            "${cmd[@]}" > "$work/$tag.log" 2>&1 &
        fi
        pid=$!
        peak=0
        while kill -0 "$pid" 2>/dev/null; do
            if [ $smi = 1 ]; then
                u=$(used_mib)
                [ -n "$u" ] && [ "$u" -gt "$peak" ] && peak=$u
            fi
            sleep 0.1
        done
        wait "$pid"
        status=$?
        proc_wall=$(awk "BEGIN {printf \"%.1f\", ($(date +%s%N) - $start) / 1e9}")
        if [ $status != 0 ]; then
            tail -n 5 "$work/$tag.log" >&2
            echo "| $s | failed (exit $status) | | | | | | | | |"; fails=$((fails + 1)); continue
        fi
        wall=$(json_num wall_seconds "$work/$tag.json")
        res=$(json_num peak_resident_bytes "$work/$tag.json")
        rss=n/a
        [ -n "$timer" ] && rss=$(awk '/Maximum resident set size/ {printf "%.0f", $NF / 1024}' "$work/$tag.time")
        dev_mib=n/a
        [ $smi = 1 ] && dev_mib=$((peak - idle))
        # The pool's high-water mark (tensors' bytes), where the report has lowtide::device's
        # device_memory.
        pool=$(json_num pool_peak_used_bytes "$work/$tag.json")
        pool=${pool:+$(awk "BEGIN {printf \"%.0f\", $pool / 1048576}")}
        pinned=$(json_num peak_pinned_host_bytes "$work/$tag.json")
        : "${base_wall:=$wall}" "${base_res:=$res}"
        awk -v s="$s" -v w="$wall" -v bw="$base_wall" -v pw="$proc_wall" -v d="$dev_mib" \
            -v p="${pool:-n/a}" -v r="$res" -v br="$base_res" -v rss="$rss" -v pin="${pinned:-0}" 'BEGIN {
            printf "| %s | %.2f | %.2fx | %s | %s | %s | %.1f | %.0f %% | %s | %.0f |\n", s, w, w / bw, pw, d,
                p, r / 1048576, (br > 0 ? 100 * r / br : 0), rss, pin / 1048576 }'
    done
    echo
    echo "targets (issue 13): model <= 1.10x, group with prefetch <= 1.05x at <= 15 % of the weights resident, sequential <= 1.5x"
fi

echo
if [ $fails = 0 ]; then
    echo "gpu-check: all checks passed"
else
    echo "gpu-check: $fails check(s) failed${keep:+ (outputs and logs in $work)}${keep:- (rerun with --keep DIR to keep the outputs and logs)}"
    exit 1
fi
