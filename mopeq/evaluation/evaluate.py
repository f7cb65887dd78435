"""MME evaluation: the official answer parsing and acc / acc+ scoring, and runs.

``score_mme`` follows the official eval_tool (``calculation.py``): per subtask ``acc`` is the
share of questions answered right, ``acc+`` the share of images with both questions right, and
the subtask score is ``100*acc + 100*acc+``. A model is evaluated through a small adapter
interface (``answer(images, questions)``, ``mopeq.evaluation.adapters``), so a quantized model
goes through exactly the same code as its baseline; ``run_evaluation`` ties data source, quick
subset and adapter together and ``compare`` sets two runs side by side (score deltas,
answer-level KL, flip rate). Data sources and the quick subset: ``mopeq.evaluation.mme_data``.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from mopeq.core.errors import MopeqError
from mopeq.evaluation import stats
from mopeq.evaluation.adapters import VLMAdapter, adapter_for
from mopeq.evaluation.mme_data import (  # noqa: F401 - re-exported: evaluation's public data API
    COGNITION,
    PERCEPTION,
    MMEItem,
    category_order,
    load_dataset,
    quick_subset,
)

PROMPT_SUFFIX = "\nAnswer the question using a single word or phrase."
MME_YES_NO_HINT = " Please answer yes or no."  # lmms-eval drops it when adding the suffix
KL_EPS = 1e-8  # floor on probabilities so KL stays finite when a model is certain


def parse_answer(text: str) -> str:
    r"""Map raw model text to "yes", "no" or "other" by the official MME rule.

    Lower-case (after stripping surrounding whitespace); exactly "yes"/"no" is taken as is;
    otherwise "yes" in the first four characters means yes, else "no" there means no, else
    "other" (always wrong). So "Yes." and "yes\n" are yes, "no," and "NO" no, "" other, and
    "Not sure" counts as no, as in the official tool.
    """
    t = (text or "").strip().lower()
    if t in ("yes", "no"):
        return t
    head = t[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


@dataclass
class EvalResult:
    """Scores of one evaluation run (MME-style, per category and in total)."""

    score: float
    per_category: dict[str, dict]  # acc, acc_plus, score, n_pairs, ci95 ([low, high])
    n_pairs: int
    elapsed_s: float = 0.0
    perception: float | None = None
    cognition: float | None = None
    records: list[dict] = field(default_factory=list, repr=False)
    score_ci95: list[float] | None = None  # stratified bootstrap over images (evaluation.stats)

    def to_json(self, with_records: bool = False) -> dict:
        """A JSON-ready dict (records only on request)."""
        out = asdict(self)
        if not with_records:
            out.pop("records")
        return out


def score_mme(records: Iterable[dict]) -> EvalResult:
    """Score records (``question_id``, ``category``, ``answer``, ``prediction``).

    Raises:
        MopeqError: when an image (``question_id``) does not have exactly two questions, or a
            gold answer is not Yes/No.
    """
    by_image: dict[tuple[str, str], list[dict]] = defaultdict(list)
    records = list(records)
    for r in records:
        if str(r["answer"]).strip().lower() not in ("yes", "no"):
            raise MopeqError(f"gold answer must be Yes or No, got {r['answer']!r}")
        by_image[(r["category"], str(r["question_id"]))].append(r)
    bad = [qid for (_, qid), rs in by_image.items() if len(rs) != 2]
    if bad:
        raise MopeqError(f"{len(bad)} image(s) do not have exactly two questions, e.g. {bad[:3]}")
    per_cat: dict[str, dict] = {}
    for cat in sorted({c for c, _ in by_image}, key=category_order):
        pairs = [rs for (c, _), rs in by_image.items() if c == cat]
        right = [[parse_answer(r["prediction"]) == r["answer"].strip().lower() for r in rs]
                 for rs in pairs]
        acc = float(np.mean([x for pair in right for x in pair]))
        acc_plus = float(np.mean([all(pair) for pair in right]))
        per_cat[cat] = {"acc": acc, "acc_plus": acc_plus, "score": 100 * acc + 100 * acc_plus,
                        "n_pairs": len(pairs)}
    total = sum(v["score"] for v in per_cat.values())
    intervals = _score_intervals(records)
    for cat, ci in intervals["per_stratum"].items():
        per_cat[cat]["ci95"] = ci
    perception = sum(v["score"] for c, v in per_cat.items() if c in PERCEPTION)
    cognition = sum(v["score"] for c, v in per_cat.items() if c in COGNITION)
    return EvalResult(total, per_cat, len(by_image),
                      perception=perception if any(c in PERCEPTION for c in per_cat) else None,
                      cognition=cognition if any(c in COGNITION for c in per_cat) else None,
                      records=records, score_ci95=intervals["total"])


def _correct(record: dict) -> bool:
    return parse_answer(record["prediction"]) == str(record["answer"]).strip().lower()


def _score_intervals(records: list[dict]) -> dict:
    """Bootstrap intervals of the total and per-category scores (images stay whole)."""
    keys = [(r["category"], str(r["question_id"]), r.get("question", ""), i)
            for i, r in enumerate(records)]
    strata, (correct,) = stats.by_image(keys, [_correct(r) for r in records])
    return stats.score_intervals(correct, strata)


def with_intervals(result: EvalResult) -> EvalResult:
    """``result`` with its intervals, computed from its records when missing (old caches)."""
    if result.score_ci95 is None and result.records:
        intervals = _score_intervals(result.records)
        result.score_ci95 = intervals["total"]
        for cat, ci in intervals["per_stratum"].items():
            result.per_category[cat]["ci95"] = ci
    return result


# ------------------------------------------------------------------------------ runs


def _prompt_text(question: str, with_suffix: bool) -> str:
    """The question as asked: lmms-eval drops MME's yes/no hint when it adds the suffix."""
    if not with_suffix:
        return question
    return question.strip().replace(MME_YES_NO_HINT, "") + PROMPT_SUFFIX


def evaluate_samples(adapter: VLMAdapter, samples: Sequence, batch_size: int = 100,
                     with_suffix: bool = False) -> EvalResult:
    """Ask every question of every sample (``scenes.Sample``-like) and score the answers."""
    start = time.perf_counter()
    flat = [(s, q) for s in samples for q in s.questions]
    records = []
    for i in range(0, len(flat), batch_size):
        chunk = flat[i : i + batch_size]
        texts, probs = adapter.answer([s.image for s, _ in chunk],
                                      [_prompt_text(q.text, with_suffix) for _, q in chunk])
        for (s, q), text, p in zip(chunk, texts, probs, strict=True):
            records.append({"question_id": s.image_id, "category": s.category,
                            "question": q.text, "answer": q.answer, "prediction": text,
                            "probs": [float(x) for x in p]})
    result = score_mme(records)
    result.elapsed_s = time.perf_counter() - start
    return result


def run_evaluation(loaded, dataset: str | Sequence = "synthetic", pairs: int | None = None,
                   seed: int = 0, batch_size: int | None = None) -> EvalResult:
    """Evaluate a loaded model on a data source, optionally on a seeded quick subset.

    Args:
        loaded: a ``models.LoadedModel`` (its ``kind`` picks the adapter).
        dataset: a ``load_dataset`` spec, or items already loaded (to load once, run many).
        pairs: image pairs of a stratified quick subset (``quick_subset``); None for all.
        seed: the subset's seed; the same (dataset, pairs, seed) always gives the same subset.
        batch_size: questions per model call (default: the adapter's).
    """
    items = load_dataset(dataset) if isinstance(dataset, str) else list(dataset)
    if pairs is not None:
        items = quick_subset(items, pairs, seed)
    adapter = adapter_for(loaded)
    return evaluate_samples(adapter, items, batch_size=batch_size or adapter.batch_size,
                            with_suffix=adapter.with_suffix)


def compare(baseline: EvalResult, other: EvalResult) -> dict:
    """Score deltas (other - baseline), answer-level KL(baseline || other) and flip rate.

    KL is over each question's (P(yes), P(no), P(other)), averaged over questions; a flip is a
    question whose parsed answer differs between the two runs. With them: paired bootstrap
    intervals over the same images (``score_delta_ci95``, ``per_category[c]["delta_ci95"]``,
    ``kl_ci95``, ``flip_rate_ci95``) and the exact McNemar test on the questions whose
    correctness changed (``p_value``, ``n_discordant``, ``mcnemar``: its ``b``/``c`` counts).

    Raises:
        MopeqError: when the runs cover different questions or their records lack ``probs``.
    """
    base, oth = _by_question(baseline), _by_question(other)
    if base.keys() != oth.keys():
        raise MopeqError("the two results cover different questions: evaluate both on the same "
                         "dataset, pairs and seed")
    keys = sorted(base)
    kl = answer_kl(np.array([base[k]["probs"] for k in keys]),
                   np.array([oth[k]["probs"] for k in keys]))
    flips = [parse_answer(base[k]["prediction"]) != parse_answer(oth[k]["prediction"])
             for k in keys]
    per_cat = {c: {"baseline": v["score"], "other": other.per_category[c]["score"],
                   "delta": other.per_category[c]["score"] - v["score"]}
               for c, v in baseline.per_category.items()}
    out = {"baseline_score": baseline.score, "other_score": other.score,
           "score_delta": other.score - baseline.score, "per_category": per_cat,
           "kl": float(kl.mean()) if len(kl) else 0.0, "kl_max": float(kl.max(initial=0.0)),
           "flip_rate": float(np.mean(flips)) if flips else 0.0, "n_questions": len(keys)}
    return {**out, **_paired_statistics(keys, base, oth, kl, flips, per_cat)}


def _paired_statistics(keys, base, oth, kl, flips, per_cat) -> dict:
    """Paired bootstrap intervals (delta, KL, flip rate) and the exact McNemar test."""
    if not keys:
        return {"score_delta_ci95": [0.0, 0.0], "p_value": 1.0, "n_discordant": 0,
                "kl_ci95": [0.0, 0.0], "flip_rate_ci95": [0.0, 0.0], "n_pairs": 0}
    right_b = [_correct(base[k]) for k in keys]
    right_o = [_correct(oth[k]) for k in keys]
    strata, (cb, co, kq, fq) = stats.by_image(keys, right_b, right_o, kl, flips)
    delta = stats.paired_score_delta(cb, co, strata)
    for cat, ci in delta["per_stratum"].items():
        per_cat[cat]["delta_ci95"] = ci
    test = stats.mcnemar_exact(cb, co)
    return {"score_delta_ci95": delta["total"], "p_value": test["p_value"],
            "n_discordant": test["n_discordant"], "mcnemar": {"b": test["b"], "c": test["c"]},
            "kl_ci95": stats.mean_interval(kq, strata),
            "flip_rate_ci95": stats.mean_interval(fq, strata), "n_pairs": len(strata)}


def answer_kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Row-wise KL(p || q) of (n, 3) answer distributions (renormalised; q floored at KL_EPS)."""
    p = np.clip(np.asarray(p, dtype=np.float64), 0, None)
    q = np.clip(np.asarray(q, dtype=np.float64), 0, None)
    p = p / p.sum(-1, keepdims=True)
    q = q / q.sum(-1, keepdims=True)
    terms = np.where(p > 0, p * (np.log(np.maximum(p, KL_EPS)) - np.log(np.maximum(q, KL_EPS))),
                     0.0)
    return np.maximum(terms.sum(-1), 0.0)


def _by_question(result: EvalResult) -> dict[tuple, dict]:
    out = {}
    for r in result.records:
        if "probs" not in r:
            raise MopeqError("records without 'probs': compare needs results of evaluate_samples")
        out[(r["category"], str(r["question_id"]), r.get("question", ""))] = r
    return out
