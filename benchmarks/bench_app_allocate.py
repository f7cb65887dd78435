"""Latency of the app's live ``allocate`` endpoint on the embedded model (what a slider move costs).

    python benchmarks/bench_app_allocate.py [--repeats 9]

Times ``mopeq.app.api.Api.allocate`` (model, scores and errors already cached, as after the
first view) for several settings, as medians, against a baseline measured in the same process:
the bare library call ``workspace.allocate`` on in-memory scores (no app overhead).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

SETTINGS = [{}, {"clusters": 2}, {"clusters": 4, "bits": [2, 3, 4, 8]}, {"scope": "layer"},
            {"method": "budget", "target_bits": 3.0}, {"snap": "mean"}]


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=9)
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    from mopeq.app import state as app_state
    from mopeq.app.api import Api
    from mopeq.workflow.spec import RunSpec
    from mopeq.workflow.workspace import Workspace, allocate

    api = Api(app_state.ModelCache())
    api.allocate(source="embedded")  # the first view: load, score, errors (then cached)
    ws = Workspace.open("embedded")
    scores = ws.profile(RunSpec(closed_form=True))
    base = _median_ms(lambda: allocate(scores, ws.layout, RunSpec()), args.repeats)
    print(f"baseline: workspace.allocate (k-means, in-memory scores) {base:.2f} ms")
    for kw in SETTINGS:
        ms = _median_ms(lambda kw=kw: api.allocate(source="embedded", **kw), args.repeats)
        print(f"  allocate endpoint {str(kw):<45} {ms:7.2f} ms   ratio {ms / base:5.2f}")


if __name__ == "__main__":
    main()
