#!/usr/bin/env python3
"""Compares the tensors in two safetensors files written by `lowtide --save-tensors`.

Usage: compare.py REFERENCE CANDIDATE TOL
    TOL = 0: bit-identical (same names, shapes, dtypes and bytes);
    TOL > 0: for every tensor, max|candidate - reference| <= TOL * max|reference|.
Prints one line per tensor (`name shape max_abs_diff / max_abs_ref = rel`) and exits 1 on any
mismatch. Needs only the Python standard library (numpy is used when present, for speed).
"""

import array
import json
import math
import struct
import sys

try:
    import numpy as np
except ImportError:  # the standard library is enough for the tiny pipelines
    np = None

FORMATS = {"F32": "f", "F64": "d"}


def read(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    header.pop("__metadata__", None)
    out = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        out[name] = (info["dtype"], tuple(info["shape"]), data[start:end])
    return out


def values(dtype, raw):
    if dtype not in FORMATS:
        sys.exit(f"error: dtype {dtype} is not compared (lowtide writes F32)")
    if np is not None:
        return np.frombuffer(raw, dtype="<" + FORMATS[dtype]).astype(np.float64)
    a = array.array(FORMATS[dtype])
    a.frombytes(raw)
    if sys.byteorder != "little":
        a.byteswap()
    return a


def max_abs(v):
    if np is not None:
        return float(np.max(np.abs(v))) if v.size else 0.0
    return max((abs(x) for x in v), default=0.0)


def max_abs_diff(a, b):
    if np is not None:
        return float(np.max(np.abs(a - b))) if a.size else 0.0
    return max((abs(x - y) for x, y in zip(a, b)), default=0.0)


def finite(v):
    if np is not None:
        return bool(np.all(np.isfinite(v)))
    return all(math.isfinite(x) for x in v)


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    ref_path, cand_path, tol = sys.argv[1], sys.argv[2], float(sys.argv[3])
    ref, cand = read(ref_path), read(cand_path)
    ok = True
    if sorted(ref) != sorted(cand):
        print(f"  tensor names differ: {sorted(ref)} vs {sorted(cand)}")
        ok = False
    for name in sorted(set(ref) & set(cand)):
        (rd, rs, rb), (cd, cs, cb) = ref[name], cand[name]
        if (rd, rs) != (cd, cs):
            print(f"  {name}: {rd}{list(rs)} vs {cd}{list(cs)}")
            ok = False
            continue
        if tol == 0:
            same = rb == cb
            print(f"  {name} {list(rs)}: {'bit-identical' if same else 'DIFFERENT BITS'}")
            ok &= same
            continue
        r, c = values(rd, rb), values(cd, cb)
        if not (finite(r) and finite(c)):
            print(f"  {name} {list(rs)}: non-finite values")
            ok = False
            continue
        diff, scale = max_abs_diff(r, c), max_abs(r)
        rel = diff / scale if scale > 0 else diff
        good = rel <= tol
        print(f"  {name} {list(rs)}: max|diff| {diff:.3e} / max|ref| {scale:.3e} = {rel:.2e} "
              f"({'ok' if good else 'ABOVE'} {tol:g})")
        ok &= good
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
