"""MME evaluation: the official answer parsing and acc / acc+ scoring, model adapters, runs.

``score_mme`` follows the official eval_tool (``calculation.py``): per subtask ``acc`` is the
share of questions answered right, ``acc+`` the share of images with both questions right, and
the subtask score is ``100*acc + 100*acc+``. A model is evaluated through a small adapter
interface (``answer(images, questions)``), so a quantized model goes through exactly the same
code as its baseline; ``run_evaluation`` ties data source, quick subset and adapter together
and ``compare`` sets two runs side by side (score deltas, answer-level KL, flip rate).
Data sources and the quick subset live in ``mopeq.evaluation.mme_data``.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from mopeq.evaluation import stats
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
        ValueError: when an image (``question_id``) does not have exactly two questions, or a
            gold answer is not Yes/No.
    """
    by_image: dict[tuple[str, str], list[dict]] = defaultdict(list)
    records = list(records)
    for r in records:
        if str(r["answer"]).strip().lower() not in ("yes", "no"):
            raise ValueError(f"gold answer must be Yes or No, got {r['answer']!r}")
        by_image[(r["category"], str(r["question_id"]))].append(r)
    bad = [qid for (_, qid), rs in by_image.items() if len(rs) != 2]
    if bad:
        raise ValueError(f"{len(bad)} image(s) do not have exactly two questions, e.g. {bad[:3]}")
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


# ---------------------------------------------------------------------------- models


class VLMAdapter(Protocol):
    """What evaluation needs from a model: raw answers, and yes/no/other probabilities.

    ``with_suffix`` says whether questions get the lmms-eval ``PROMPT_SUFFIX``;
    ``batch_size`` is the adapter's default number of questions per call.
    """

    with_suffix: bool
    batch_size: int

    def answer(self, images: Sequence, questions: Sequence[str]) -> tuple[list[str], np.ndarray]:
        """Return the generated texts and an (n, 3) array of P(yes), P(no), P(other)."""
        ...


class TinyVLMAdapter:
    """Greedy answers of the embedded tiny VLM (also after quantization).

    Images that are not already ``image_size`` squares (e.g. real MME photos) are resized.
    The model was trained without the lmms-eval suffix, so it gets the bare question.
    """

    with_suffix = False
    batch_size = 100

    def __init__(self, model, processor, max_new_tokens: int = 4):
        self.model = model
        self.processor = processor
        self.max_new_tokens = max_new_tokens
        tok = processor.tokenizer
        self.yes_no = [tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")]
        self.image_size = int(getattr(model.config, "image_size", 64))

    @torch.no_grad()
    def answer(self, images, questions):
        """Greedy-decode short answers for a batch of (image, question) pairs."""
        arrays = [_square_rgb(im, self.image_size) for im in images]
        inputs = self.processor(arrays, questions)
        embeds = self.model.embed(inputs["input_ids"], inputs["pixel_values"])
        mask = inputs["attention_mask"]
        lm = self.model.language_model
        out_tokens, probs, cache = [], None, None
        done = torch.zeros(len(questions), dtype=torch.bool)
        eos = self.processor.tokenizer.eos_token_id
        for step in range(self.max_new_tokens):  # KV-cached: later steps feed one token
            pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -embeds.shape[1]:]
            out = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, cache=cache,
                     use_cache=True, logits_to_keep=1)
            cache, logits = out.cache, out.logits[:, -1]
            if step == 0:
                probs = _yes_no_other(logits, [self.yes_no[0]], [self.yes_no[1]])
            nxt = logits.argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
            out_tokens.append(nxt)
            done |= nxt == eos
            if bool(done.all()):
                break
            embeds = lm.get_input_embeddings()(nxt).unsqueeze(1).to(embeds.dtype)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        tokens = torch.stack(out_tokens, 1)
        texts = self.processor.tokenizer.batch_decode(tokens, skip_special_tokens=True)
        return [t.strip() for t in texts], probs


def _square_rgb(image: Any, size: int) -> np.ndarray:
    """An image (array or PIL) as a uint8 ``size`` x ``size`` x 3 array."""
    arr = np.asarray(image)
    if arr.shape == (size, size, 3) and arr.dtype == np.uint8:
        return arr
    from PIL import Image

    im = image if isinstance(image, Image.Image) else Image.fromarray(arr)
    return np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.uint8)


def _yes_no_other(logits: torch.Tensor, yes_ids: Sequence[int],
                  no_ids: Sequence[int]) -> np.ndarray:
    """(n, 3) P(yes), P(no), P(other) from next-token logits; other = 1 - yes - no."""
    p = logits.float().softmax(-1)
    yes = p[:, list(yes_ids)].sum(-1)
    no = p[:, list(no_ids)].sum(-1)
    other = (1 - yes - no).clamp(min=0)
    return torch.stack([yes, no, other], -1).cpu().numpy()


class HFVLMAdapter:
    r"""Greedy answers of a transformers vision-language model through its processor.

    The prompt is the processor's chat template over one user turn (an image, then the
    question with ``PROMPT_SUFFIX``), or ``"<image token>\n" + question`` when the processor
    has no template. ``generate`` runs greedy with ``max_new_tokens=16`` and only the new
    tokens are decoded. P(yes) / P(no) are the softmax mass of the first generated step on the
    tokens the tokenizer uses for "Yes"/"yes" (resp. "No"/"no"), with and without a leading
    space, counting only spellings that encode to a single token; P(other) is the rest.
    """

    with_suffix = True
    batch_size = 8

    def __init__(self, model, processor, max_new_tokens: int = 16):
        if getattr(getattr(model, "config", None), "vision_config", None) is None:
            raise ValueError(f"{type(model).__name__} has no vision tower: a causal-LM-only "
                             "model cannot be evaluated on images; pass a vision-language model")
        if processor is None or getattr(processor, "image_processor", None) is None:
            raise ValueError("the model's processor cannot prepare images (got "
                             f"{type(processor).__name__}); load it with AutoProcessor")
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.max_new_tokens = max_new_tokens
        self.yes_ids = answer_token_ids(self.tokenizer, ("Yes", "yes"))
        self.no_ids = answer_token_ids(self.tokenizer, ("No", "no"))

    def prompt(self, question: str) -> str:
        """The text for one question: the chat template with one image, or a plain fallback."""
        if getattr(self.processor, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "image"},
                                                     {"type": "text", "text": question}]}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True,
                                                      tokenize=False)
        token = getattr(self.processor, "image_token", None)
        if not token:
            raise ValueError("the processor has neither a chat template nor an image token")
        return f"{token}\n{question}"

    @torch.no_grad()
    def answer(self, images, questions):
        """Greedy-decode short answers for a batch of (image, question) pairs."""
        inputs = self.processor(text=[self.prompt(q) for q in questions],
                                images=[_rgb(im) for im in images], padding=True,
                                padding_side="left", return_tensors="pt")
        inputs = inputs.to(self.model.device, dtype=self.model.dtype)
        out = self.model.generate(**inputs, do_sample=False, num_beams=1,
                                  max_new_tokens=self.max_new_tokens, output_logits=True,
                                  return_dict_in_generate=True,
                                  pad_token_id=self.tokenizer.pad_token_id)
        new = out.sequences[:, inputs["input_ids"].shape[1]:]
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return [t.strip() for t in texts], _yes_no_other(out.logits[0], self.yes_ids, self.no_ids)


def answer_token_ids(tokenizer, words: Sequence[str]) -> list[int]:
    """Ids of the single-token encodings of ``words``, with and without a leading space."""
    ids = set()
    for word in words:
        for text in (word, " " + word):
            enc = tokenizer.encode(text, add_special_tokens=False)
            if len(enc) == 1:
                ids.add(int(enc[0]))
    return sorted(ids)


def _rgb(image: Any):
    from PIL import Image

    return image.convert("RGB") if isinstance(image, Image.Image) else Image.fromarray(
        np.asarray(image, dtype=np.uint8))


def adapter_for(loaded) -> VLMAdapter:
    """The adapter for a ``models.LoadedModel`` (tiny VLM or transformers VLM).

    Raises:
        ValueError: for a causal language model (no vision tower) or an unknown kind.
    """
    native = getattr(loaded.model, "mme_adapter", None)  # mopeq.model.archs models bring their own
    if callable(native):
        return native(loaded.processor)
    if loaded.kind == "tiny_vlm":
        return TinyVLMAdapter(loaded.model, loaded.processor)
    native = getattr(loaded.processor, "mme_adapter", None)  # mopeq.model.archs: own prompt format
    if loaded.kind == "vlm" and callable(native):
        return native(loaded.model)
    if loaded.kind == "vlm":
        return HFVLMAdapter(loaded.model, loaded.processor)
    if loaded.kind == "causal_lm":
        raise ValueError(f"{loaded.source} is a causal language model without a vision tower: "
                         "MME asks questions about images, so evaluate a vision-language model")
    raise ValueError(f"cannot evaluate a model of kind {loaded.kind!r}")


# ------------------------------------------------------------------------------ runs


def _prompt_text(question: str, with_suffix: bool) -> str:
    """The question as asked: lmms-eval drops MME's yes/no hint when it adds the suffix."""
    if not with_suffix:
        return question
    return question.strip().replace(MME_YES_NO_HINT, "") + PROMPT_SUFFIX


def evaluate_samples(adapter: VLMAdapter, samples: Sequence, batch_size: int = 100,
                     with_suffix: bool = False) -> EvalResult:
    """Ask every question of every sample (``synthetic.Sample``-like) and score the answers."""
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
        ValueError: when the runs cover different questions or their records lack ``probs``.
    """
    base, oth = _by_question(baseline), _by_question(other)
    if base.keys() != oth.keys():
        raise ValueError("the two results cover different questions: evaluate both on the same "
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
            raise ValueError("records without 'probs': compare needs results of evaluate_samples")
        out[(r["category"], str(r["question_id"]), r.get("question", ""))] = r
    return out
