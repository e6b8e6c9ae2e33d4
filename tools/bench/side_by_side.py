"""Side-by-side benchmark: two commands run interleaved (A B A B ...), each under /usr/bin/time -v,
then medians of wall, user and system CPU time and peak RSS, and the A/B ratio of each.

    python3 tools/bench/side_by_side.py --pairs 3 \
        --a "lowtide=target/release/lowtide generate --model /tmp/sd15 ... --report /tmp/r.json" \
        --after-a "python3 tools/bench/report_metrics.py /tmp/r.json" \
        --b "diffusers=python tools/bench/diffusers_generate.py /tmp/sd15 ..."

Either side may print lines `METRIC name value` (or an --after-X command, run untimed after each
run, may): those are medianed and compared too (e.g. one denoiser call, the weight load). The
machine is shared and noisy: ratios from one interleaved run are what count, not absolute times.
"""

import argparse
import re
import statistics
import subprocess
import sys
import tempfile

METRIC = re.compile(r"^METRIC (\S+) ([-+0-9.eE]+)\s*$", re.M)


def clock(s):
    """/usr/bin/time's h:mm:ss or m:ss.ss -> seconds."""
    v = 0.0
    for part in s.split(":"):
        v = v * 60 + float(part)
    return v


def run(cmd, after):
    with tempfile.NamedTemporaryFile("r", suffix=".time") as t:
        p = subprocess.run(["/usr/bin/time", "-v", "-o", t.name, "bash", "-c", cmd],
                           capture_output=True, text=True)
        timing = t.read()
    if p.returncode != 0:
        sys.exit(f"failed ({p.returncode}): {cmd}\n{p.stderr[-2000:]}")
    field = lambda k: re.search(rf"{re.escape(k)}.*?: (\S+)", timing).group(1)  # noqa: E731
    m = {"wall s": clock(field("Elapsed (wall clock) time")), "user s": float(field("User time")),
         "system s": float(field("System time")), "peak RSS MiB": int(field("Maximum resident set size")) / 1024}
    text = p.stdout + p.stderr
    if after:
        text += subprocess.run(["bash", "-c", after], capture_output=True, text=True, check=True).stdout
    per_run = {}
    for name, value in METRIC.findall(text):
        per_run.setdefault(name, []).append(float(value))
    m.update({k: statistics.median(v) for k, v in per_run.items()})
    return m


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--a", required=True, help="NAME=shell command")
    ap.add_argument("--b", required=True, help="NAME=shell command")
    ap.add_argument("--after-a", help="untimed command after each A run that prints METRIC lines")
    ap.add_argument("--after-b")
    ap.add_argument("--title", default="")
    a = ap.parse_args()
    (na, ca), (nb, cb) = (x.split("=", 1) for x in (a.a, a.b))
    runs = {na: [], nb: []}
    for i in range(a.pairs):
        for name, cmd, after in ((na, ca, a.after_a), (nb, cb, a.after_b)):
            m = run(cmd, after)
            runs[name].append(m)
            print(f"pair {i + 1} {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in m.items()), file=sys.stderr, flush=True)
    keys = [k for k in runs[na][0] if all(k in r for r in runs[na] + runs[nb])]
    med = {n: {k: statistics.median(r[k] for r in rs) for k in keys} for n, rs in runs.items()}
    if a.title:
        print(f"{a.title} ({a.pairs} interleaved pairs, medians)\n")
    print(f"| | {na} | {nb} | {na}/{nb} |\n|---|---|---|---|")
    for k in keys:
        x, y = med[na][k], med[nb][k]
        print(f"| {k} | {x:.2f} | {y:.2f} | {x / y:.2f}x |" if y else f"| {k} | {x:.2f} | {y:.2f} | |")


if __name__ == "__main__":
    main()
