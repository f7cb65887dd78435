"""Answer margins and the training curve of the embedded model (the README's tables).

    python benchmarks/embedded_report.py [--model embedded] [--pairs N]

Margins: for every held-out question, log P(right answer) - log P(wrong answer) at the first
answer token (yes vs no); a negative margin is a wrong answer. Small margins are what
quantization noise can flip, so their histogram explains how sensitive a model is. The
training curve comes from ``training_log.json`` beside the weights: it is measured on the
validation split (``eval_split(seed=1)``), never on the held-out split of the bar.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

EDGES = (-np.inf, -4, -2, -1, 0, 1, 2, 4, 8, np.inf)


def margins(result) -> np.ndarray:
    """Signed log-odds of the right answer, one per question."""
    out = []
    for rec in result.records:
        p_yes, p_no = max(rec["probs"][0], 1e-12), max(rec["probs"][1], 1e-12)
        m = np.log(p_yes) - np.log(p_no)
        out.append(m if str(rec["answer"]).lower() == "yes" else -m)
    return np.array(out)


def histogram_table(values: np.ndarray) -> str:
    """A markdown histogram: margin bin, count, share, a bar."""
    counts, _ = np.histogram(values, bins=np.array(EDGES, dtype=float))
    lines = ["| margin (log-odds) | questions | share | |", "|---|---|---|---|"]
    for lo, hi, n in zip(EDGES[:-1], EDGES[1:], counts, strict=True):
        share = n / max(len(values), 1)
        bar = "#" * round(60 * share)
        lines.append(f"| [{lo:g}, {hi:g}) | {n} | {100 * share:.1f} % | {bar} |")
    return "\n".join(lines)


def curve_table(log: dict, maximum: float) -> str:
    """Training steps, minutes and the validation score (total and per category)."""
    points = log.get("curve", [])
    if not points:
        return "(no training curve in training_log.json)"
    cats = list(points[0]["per_category"])
    probes = [k for k in ("relation", "cells", "gather") if any(k in p for p in points)]
    extra = f" probe losses: {' / '.join(probes)} |" if probes else ""
    lines = [f"| phase · step | minutes | total (% of max) | {' | '.join(cats)} |{extra}",
             "|---" * (len(cats) + 3 + bool(probes)) + "|"]
    for p in points:  # minutes count from each phase's start
        per = " | ".join(f"{p['per_category'][c]:.0f}" for c in cats)
        losses = " / ".join(f"{p[k]:.2f}" if k in p else "–" for k in probes)
        lines.append(f"| {p.get('phase', 0)} · {p['step']} | {p['minutes']:.1f} | "
                     f"{p['score']:.0f} ({100 * p['score'] / maximum:.1f} %) | {per} |"
                     + (f" {losses} |" if probes else ""))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="embedded")
    p.add_argument("--pairs", type=int, default=None, help="default: the whole held-out split")
    args = p.parse_args()

    import torch

    torch.set_num_threads(1)
    from mopeq.evaluation.evaluate import run_evaluation
    from mopeq.model.loading import EMBEDDED_DIR, load_model

    loaded = load_model(args.model)
    result = run_evaluation(loaded, "synthetic", pairs=args.pairs)
    m = margins(result)
    print(f"## Answer margins ({len(m)} held-out questions)\n")
    print(histogram_table(m))
    print(f"\nmedian {np.median(m):.2f}, share with |margin| < 1: "
          f"{100 * np.mean(np.abs(m) < 1):.1f} %, wrong (margin < 0): {100 * np.mean(m < 0):.1f} %")
    folder = EMBEDDED_DIR if args.model == "embedded" else Path(args.model)
    log_file = folder / "training_log.json"
    if log_file.exists():
        maximum = 200.0 * len(result.per_category)
        print("\n## Training curve (validation split)\n")
        print(curve_table(json.loads(log_file.read_text()), maximum))


if __name__ == "__main__":
    main()
