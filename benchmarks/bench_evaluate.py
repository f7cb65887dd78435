"""Evaluation throughput (image pairs per second) of a model on the synthetic split.

    python benchmarks/bench_evaluate.py [--model embedded] [--pairs 100] [--repeats 5]

Reports the median over ``--repeats`` runs of the full evaluation (prompting, greedy decoding,
scoring), and two baselines measured in the same process for scale: prefill plus one decoding
step only (``max_new_tokens=1``) and the scoring alone. When the embedded model is missing, a
random-weight model of the same recipe stands in (it says so): a random model rarely emits
<eos>, so it decodes every step, while a trained one stops after "yes"/"no" + <eos>.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout
from mopeq.embedded import synthetic, tiny  # noqa: E402
from mopeq.evaluation.adapters import adapter_for  # noqa: E402
from mopeq.evaluation.evaluate import evaluate_samples, score_mme  # noqa: E402
from mopeq.evaluation.mme_data import quick_subset  # noqa: E402
from mopeq.model.loading import EMBEDDED, LoadedModel, ModelLoadError, load_model  # noqa: E402


def _model(source: str) -> tuple[LoadedModel, str]:
    try:
        loaded = load_model(source)
        return loaded, f"{source} ({type(loaded.model).__name__})"
    except ModelLoadError:
        if source != EMBEDDED:
            raise
    model, processor = tiny.new_model(tiny.TinyRecipe())
    label = "random-weight tiny VLM, default TinyRecipe (embedded model not found)"
    return LoadedModel(model.eval(), processor, "random", "random", "tiny_vlm"), label


def _rates(fn, n_pairs: int, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(n_pairs / (time.perf_counter() - start))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=EMBEDDED)
    p.add_argument("--pairs", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    loaded, label = _model(args.model)
    items = quick_subset(synthetic.eval_split(), args.pairs, seed=0)
    adapter = adapter_for(loaded)
    prefill = copy.copy(adapter)
    prefill.max_new_tokens = 1

    def run(a):
        return evaluate_samples(a, items, batch_size=a.batch_size, with_suffix=a.with_suffix)

    result = run(adapter)  # warm-up, and the records for the scoring baseline
    full = _rates(lambda: run(adapter), len(items), args.repeats)
    first = _rates(lambda: run(prefill), len(items), args.repeats)
    scoring = _rates(lambda: score_mme(result.records), len(items), args.repeats)
    report = {
        "model": label, "torch_threads": torch.get_num_threads(), "pairs": len(items),
        "repeats": args.repeats, "batch_size": adapter.batch_size,
        "pairs_per_s": round(statistics.median(full), 1),
        "pairs_per_s_min_max": [round(min(full), 1), round(max(full), 1)],
        "baseline_prefill_only_pairs_per_s": round(statistics.median(first), 1),
        "baseline_scoring_only_pairs_per_s": round(statistics.median(scoring), 1),
        "score": round(result.score, 1),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
