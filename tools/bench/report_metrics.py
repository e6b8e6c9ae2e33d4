"""Prints METRIC lines from a lowtide `--report` JSON, for side_by_side.py: the median denoising
step (one denoiser call plus the scheduler step), the weight-loading time and the compute time."""

import json
import statistics
import sys

r = json.load(open(sys.argv[1]))
if r.get("step_seconds"):
    print(f"METRIC step_s {statistics.median(r['step_seconds'])}")
print(f"METRIC load_s {r['transfer_seconds']}")
