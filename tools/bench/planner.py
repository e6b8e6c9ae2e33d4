#!/usr/bin/env python3
"""`--memory-budget` against every manual strategy, interleaved (A B A B ...), medians.

Per round: each manual strategy once (none, model, group, sequential), then the planner once
per budget; wall time and peak RSS from `/usr/bin/time -v`, the planner's predicted peak and
per-phase figures from `--report`. A manual strategy "fits" a budget when its measured peak RSS
is at or under it. Prints a Markdown table per budget.

    python3 tools/bench/planner.py --model /tmp/sd15 --size 512 --steps 3 --rounds 2 \
        --budgets 8GiB,2.5GiB,1GiB,min [--plot-dir /tmp/plots]

`min` is the smallest budget the planner accepts (from `lowtide plan`'s error, plus its margin).
The page cache is warmed first (every run reads warm files).
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile

UNITS = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "": 1}


def parse_size(s):
    m = re.fullmatch(r"([0-9.]+)\s*([a-zA-Z]*)", s.strip())
    return int(float(m.group(1)) * UNITS[m.group(2).lower()])


def mib(b):
    return f"{b / 2**20:.0f}"


def timed(cmd):
    r = subprocess.run(["/usr/bin/time", "-v"] + cmd, capture_output=True, text=True)
    if r.returncode != 0:
        return None, r.stderr
    wall = re.search(r"Elapsed \(wall clock\) time .*: (?:(\d+):)?(\d+):([\d.]+)", r.stderr)
    h, m, sec = wall.groups()
    wall = int(h or 0) * 3600 + int(m) * 60 + float(sec)
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1)) * 1024
    return {"wall": wall, "rss": rss}, r.stderr


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--bin", default="target/release/lowtide")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--budgets", default="8GiB,2.5GiB,1GiB,min")
    ap.add_argument("--manual", default="none,model,group,sequential")
    ap.add_argument("--extra", default="", help="more generate arguments")
    ap.add_argument("--plot-dir")
    a = ap.parse_args()

    tmp = tempfile.mkdtemp()
    base = [a.bin, "generate", "--model", a.model, "--prompt", "a photograph of an astronaut riding a horse",
            "--steps", str(a.steps), "--seed", "1", "--width", str(a.size), "--height", str(a.size)]
    base += a.extra.split()
    if "--scheduler" not in a.extra and "flux" not in a.model and "wan" not in a.model:
        base += ["--scheduler", "euler"]
    video = "wan" in a.model
    ext = "mp4" if video else "png"
    subprocess.run(f"find {a.model} -name '*.safetensors' -exec cat {{}} + > /dev/null", shell=True)

    budgets = []
    for b in a.budgets.split(","):
        if b == "min":
            plan = [a.bin, "plan"] + base[2:] + ["--memory-budget", "1MiB"]
            r = subprocess.run(plan, capture_output=True, text=True)
            need = re.search(r"needs about ([0-9.]+) (MiB|GiB)", r.stderr)
            if not need:
                sys.exit(f"cannot find the minimum: {r.stderr}")
            n = parse_size(need.group(1) + need.group(2))
            # The planner keeps 3 % free; 2 % more for the rounding of "about".
            budgets.append(("min", int(n / 0.95)))
        else:
            budgets.append((b, parse_size(b)))

    runs = {}
    for rnd in range(a.rounds):
        for s in a.manual.split(","):
            key = ("manual", s)
            out = os.path.join(tmp, f"{s}.{ext}")
            res, err = timed(base + ["--offload", s, "--out", out])
            if res is None:
                print(f"{s} failed: {err[-400:]}", file=sys.stderr)
                continue
            runs.setdefault(key, []).append(res)
            print(f"round {rnd} {s}: {res['wall']:.1f} s, {mib(res['rss'])} MiB", file=sys.stderr)
        for label, b in budgets:
            key = ("plan", label)
            rep = os.path.join(tmp, f"plan-{label}.json")
            cmd = base + ["--memory-budget", str(b), "--out", os.path.join(tmp, f"plan.{ext}"), "--report", rep]
            if a.plot_dir and rnd == 0:
                os.makedirs(a.plot_dir, exist_ok=True)
                cmd += ["--report-plot", os.path.join(a.plot_dir, f"plan-{label}.png")]
            res, err = timed(cmd)
            if res is None:
                print(f"budget {label} failed: {err[-600:]}", file=sys.stderr)
                continue
            r = json.load(open(rep))
            res["plan"] = r["plan"]
            res["choice"] = next(l for l in err.splitlines() if l.startswith("plan for"))
            runs.setdefault(key, []).append(res)
            print(f"round {rnd} budget {label}: {res['wall']:.1f} s, {mib(res['rss'])} MiB; {res['choice']}", file=sys.stderr)

    def med(key, f):
        return statistics.median(x[f] for x in runs[key])

    print(f"\nmodel {a.model}, {a.size}x{a.size}, {a.steps} steps, {a.rounds} rounds interleaved, medians\n")
    for label, b in budgets:
        key = ("plan", label)
        if key not in runs:
            print(f"budget {label}: the planner failed\n")
            continue
        p = runs[key][0]["plan"]
        pw, pr = med(key, "wall"), med(key, "rss")
        print(f"**budget {label} ({mib(b)} MiB)** — {runs[key][0]['choice'].split(': ', 1)[1]}\n")
        print("| run | wall s | peak RSS MiB | under budget | time vs planner |")
        print("|---|---|---|---|---|")
        print(f"| planner | {pw:.1f} | {mib(pr)} (predicted {mib(p['predicted_peak_bytes'])}, "
              f"{100 * (p['predicted_peak_bytes'] / pr - 1):+.1f} %) | {'yes' if pr <= b else 'NO'} | 1.00x |")
        best = None
        for s in a.manual.split(","):
            k = ("manual", s)
            if k not in runs:
                continue
            w, r = med(k, "wall"), med(k, "rss")
            fits = max(x["rss"] for x in runs[k]) <= b
            if fits and (best is None or w < best[1]):
                best = (s, w)
            print(f"| --offload {s} | {w:.1f} | {mib(r)} | {'yes' if fits else 'no'} | {w / pw:.2f}x |")
        if best:
            print(f"\nfastest manual setting that fits: {best[0]}; planner / it = {pw / best[1]:.2f}x")
        phases = ", ".join(
            f"{ph['label']} {mib(ph['predicted_peak_bytes'])}/{mib(ph.get('measured_peak_bytes') or 0)}"
            for ph in p["phases"])
        print(f"\nper phase, predicted/measured MiB: {phases}\n")


if __name__ == "__main__":
    main()
