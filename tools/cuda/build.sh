#!/usr/bin/env bash
# Builds lowtide with the CUDA backend (`cargo build --release --features cuda`), on a machine
# with or without a GPU and with or without a CUDA toolkit.
#
# Usage: tools/cuda/build.sh [extra cargo build arguments]
#
# Toolkit, in this order:
#   1. $CUDA_VENV set: the CUDA toolkit from PyPI wheels in that venv (created/installed if needed);
#   2. $CUDA_HOME set: that toolkit (needs $CUDA_HOME/bin/nvcc);
#   3. `nvcc` on PATH: its toolkit;
#   4. otherwise the PyPI toolkit in ${XDG_CACHE_HOME:-~/.cache}/lowtide/cuda-$CUDA_TOOLKIT_VERSION,
#      from `pip install "cuda-toolkit[nvcc,cccl]==$CUDA_TOOLKIT_VERSION"` (needs python3 with
#      venv; about 120 MB of wheels, 370 MB installed; nvcc, cicc, headers, CCCL and libcudart).
# Environment:
#   CUDA_TOOLKIT_VERSION  PyPI toolkit version (default 13.4.3). The binary's kernels are PTX
#                         JIT-compiled by the driver at load, so the driver of the machine that
#                         runs the binary must support this CUDA version (see the README).
#   CUDA_COMPUTE_CAP      GPU architecture the kernels are compiled for (default: the GPU's,
#                         from nvidia-smi, else 80 = Ampere; the PTX runs on that architecture
#                         and newer ones, except 90 = sm_90a, which runs on Hopper only).
#   LOWTIDE_CUDA_STUBS    auto (default): link-time stand-ins for the CUDA libraries that the
#                         linker cannot find (always libcuda without a driver; libnvrtc, libcurand,
#                         libcublas, libcublasLt with the PyPI toolkit); 0: none (fail instead).
#   CARGO_TARGET_DIR      as for cargo (default: target).
#
# The stand-ins (tools/cuda/make_stubs.py) go to $CUDA_HOME/lib/stubs, which cudarc's build
# script adds to the link search path; they are never put on a run-time library path. Running the
# binary needs the NVIDIA driver (libcuda.so.1) and the CUDA 13 libraries libcudart.so.13,
# libcublas.so.13, libcublasLt.so.13, libcurand.so.10, libnvrtc.so.13 (see tools/cuda/gpu-check.sh).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
here=$root/tools/cuda
cd "$root"

version=${CUDA_TOOLKIT_VERSION:-13.4.3}
stubs_mode=${LOWTIDE_CUDA_STUBS:-auto}
if [ -z "${CUDA_COMPUTE_CAP:-}" ]; then
    # The first GPU's, when there is one (as cudaforge would do), else Ampere's.
    CUDA_COMPUTE_CAP=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d '.' || true)
    export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-80}
fi
say() { echo "cuda-build: $*" >&2; }
die() { echo "cuda-build: error: $*" >&2; exit 1; }
start=$(date +%s)

pip_toolkit() {
    local venv=$1 py site
    if [ ! -x "$venv/bin/python" ]; then
        say "creating the venv $venv"
        python3 -m venv "$venv" || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
    fi
    py=$venv/bin/python
    if [ "$("$py" -c 'import importlib.metadata as m; print(m.version("cuda-toolkit"))' 2>/dev/null)" != "$version" ]; then
        say "installing cuda-toolkit[nvcc,cccl]==$version from PyPI into $venv"
        "$py" -m pip install --quiet --disable-pip-version-check "cuda-toolkit[nvcc,cccl]==$version"
    fi
    site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    CUDA_HOME=$site/nvidia/cu${version%%.*}
    [ -x "$CUDA_HOME/bin/nvcc" ] || die "no nvcc at $CUDA_HOME/bin after installing cuda-toolkit $version"
}

if [ -n "${CUDA_VENV:-}" ]; then
    pip_toolkit "$CUDA_VENV"
elif [ -n "${CUDA_HOME:-}" ]; then
    [ -x "$CUDA_HOME/bin/nvcc" ] || die "CUDA_HOME=$CUDA_HOME has no bin/nvcc"
elif command -v nvcc >/dev/null; then
    CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
else
    pip_toolkit "${XDG_CACHE_HOME:-$HOME/.cache}/lowtide/cuda-$version"
fi
export CUDA_HOME
export PATH=$CUDA_HOME/bin:$PATH

# cudarc reads the version from `nvcc --version` and knows 11.4 ... 13.4; a newer 13.x toolkit
# builds against the 13.4 bindings (the driver API is stable within a major version).
release=$(nvcc --version | sed -n 's/.*release \([0-9]*\)\.\([0-9]*\).*/\1 \2/p')
read -r major minor <<< "$release"
[ -n "$major" ] || die "cannot read the version from \`nvcc --version\`"
say "toolkit $CUDA_HOME (CUDA $major.$minor), kernels for compute capability $CUDA_COMPUTE_CAP"
if [ -z "${CUDARC_CUDA_VERSION:-}" ] && { [ "$major" -gt 13 ] || { [ "$major" -eq 13 ] && [ "$minor" -gt 4 ]; }; }; then
    export CUDARC_CUDA_VERSION=13040
    say "CUDA $major.$minor is newer than cudarc's bindings: CUDARC_CUDA_VERSION=$CUDARC_CUDA_VERSION"
fi

# The libraries the link needs: cudarc's `-lcuda -lnvrtc -lcurand -lcublas -lcublasLt` and
# candle-kernels' `-lcudart`. cudarc searches $CUDA_HOME/{lib,lib/stubs,lib64,lib64/stubs,
# targets/x86_64-linux/lib,...}, but only folders that exist when its build script runs, so
# everything is put in place before cargo starts.
lib_dirs=(lib lib/stubs lib64 lib64/stubs targets/x86_64-linux/lib targets/x86_64-linux/lib/stubs)
findable() { # lib name -> 0 if the linker would find lib$1.so
    local d
    for d in "${lib_dirs[@]}"; do [ -e "$CUDA_HOME/$d/lib$1.so" ] && return 0; done
    [ "$(${CC:-cc} -print-file-name="lib$1.so")" != "lib$1.so" ]
}
# Stand-ins made by an earlier run are made again (cudarc's bindings may have changed since).
marker=$CUDA_HOME/lib/stubs/.made-by-lowtide
if [ -f "$marker" ]; then
    while read -r lib; do rm -f "$CUDA_HOME/lib/stubs/lib$lib.so"; done < "$marker"
    rm -f "$marker"
fi
stubs=()
for lib in cudart cuda nvrtc curand cublas cublasLt; do
    findable "$lib" && continue
    # A wheel ships only the versioned name (libcudart.so.13): add the unversioned one.
    real=$(find "$CUDA_HOME/lib" "$CUDA_HOME/lib64" -maxdepth 1 -name "lib$lib.so.[0-9]*" 2>/dev/null | sort | head -n1 || true)
    if [ -n "$real" ]; then
        ln -sfn "$(basename "$real")" "$(dirname "$real")/lib$lib.so"
        say "linked lib$lib.so -> $(basename "$real")"
    elif [ "$lib" = cudart ]; then
        die "no libcudart in $CUDA_HOME (the toolkit is incomplete)"
    else
        stubs+=("$lib")
    fi
done
if [ ${#stubs[@]} -gt 0 ]; then
    [ "$stubs_mode" != 0 ] || die "not found: ${stubs[*]} (LOWTIDE_CUDA_STUBS=0)"
    # The stand-ins export the entry points of cudarc's bindings, read from the locked cudarc.
    cudarc=$(cargo metadata --locked --format-version 1 --features cuda |
        python3 -c 'import json,sys,os; print(next(os.path.dirname(p["manifest_path"]) for p in json.load(sys.stdin)["packages"] if p["name"] == "cudarc"))')
    mkdir -p "$CUDA_HOME/lib/stubs" 2>/dev/null && [ -w "$CUDA_HOME/lib/stubs" ] ||
        die "not found: ${stubs[*]}, and $CUDA_HOME/lib/stubs is not writable for stand-ins"
    say "link-time stand-ins (not for run time) for: ${stubs[*]}"
    python3 "$here/make_stubs.py" "$cudarc" "$CUDA_HOME/lib/stubs" "${stubs[@]}"
    printf '%s\n' "${stubs[@]}" > "$marker"
fi

# One build: `cargo check` and `cargo build` would each rerun candle-kernels' nvcc step.
say "cargo build --release --features cuda $*"
cargo build --locked --release --features cuda "$@"

bin=${CARGO_TARGET_DIR:-target}/release/lowtide
if [ -x "$bin" ] && command -v readelf >/dev/null; then
    if readelf -d "$bin" | grep -E 'R(UN)?PATH' | grep -q stubs; then
        die "$bin has the stand-ins' folder in its run path"
    fi
    say "$bin needs at run time: $(readelf -d "$bin" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p' | tr '\n' ' ')"
fi
say "done in $(( $(date +%s) - start )) s"
