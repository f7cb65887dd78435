"""MME evaluation: the official answer parsing and acc / acc+ scoring, quick subsets, models.

``score_mme`` follows the official eval_tool (``calculation.py``): per subtask ``acc`` is the
share of questions answered right, ``acc+`` the share of images with both questions right, and
the subtask score is ``100*acc + 100*acc+``. A model is evaluated through a small adapter
interface (``answer(images, questions)``), so a quantized model goes through exactly the same
code as its baseline.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol

import numpy as np
import torch

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene",
              "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation",
             "code_reasoning")
PROMPT_SUFFIX = "\nAnswer the question using a single word or phrase."


def parse_answer(text: str) -> str:
    """Map raw model text to "yes", "no" or "other" by the official MME rule."""
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
    per_category: dict[str, dict]
    n_pairs: int
    elapsed_s: float = 0.0
    perception: float | None = None
    cognition: float | None = None
    records: list[dict] = field(default_factory=list, repr=False)

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
    for cat in sorted({c for c, _ in by_image}, key=_category_order):
        pairs = [rs for (c, _), rs in by_image.items() if c == cat]
        right = [[parse_answer(r["prediction"]) == r["answer"].strip().lower() for r in rs]
                 for rs in pairs]
        acc = float(np.mean([x for pair in right for x in pair]))
        acc_plus = float(np.mean([all(pair) for pair in right]))
        per_cat[cat] = {"acc": acc, "acc_plus": acc_plus, "score": 100 * acc + 100 * acc_plus,
                        "n_pairs": len(pairs)}
    total = sum(v["score"] for v in per_cat.values())
    perception = sum(v["score"] for c, v in per_cat.items() if c in PERCEPTION)
    cognition = sum(v["score"] for c, v in per_cat.items() if c in COGNITION)
    return EvalResult(total, per_cat, len(by_image),
                      perception=perception if any(c in PERCEPTION for c in per_cat) else None,
                      cognition=cognition if any(c in COGNITION for c in per_cat) else None,
                      records=records)


def _category_order(cat: str) -> tuple[int, str]:
    order = PERCEPTION + COGNITION
    return (order.index(cat) if cat in order else len(order), cat)


# ---------------------------------------------------------------------------- models


class VLMAdapter(Protocol):
    """What evaluation needs from a model: raw answers, and yes/no/other probabilities."""

    def answer(self, images: Sequence, questions: Sequence[str]) -> tuple[list[str], np.ndarray]:
        """Return the generated texts and an (n, 3) array of P(yes), P(no), P(other)."""
        ...


class TinyVLMAdapter:
    """Greedy answers of the embedded tiny VLM (also after quantization)."""

    def __init__(self, model, processor, max_new_tokens: int = 4):
        self.model = model
        self.processor = processor
        self.max_new_tokens = max_new_tokens
        tok = processor.tokenizer
        self.yes_no = [tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")]

    @torch.no_grad()
    def answer(self, images, questions):
        """Greedy-decode short answers for a batch of (image, question) pairs."""
        inputs = self.processor(images, questions)
        embeds = self.model.embed(inputs["input_ids"], inputs["pixel_values"])
        mask = inputs["attention_mask"]
        lm = self.model.language_model
        out_tokens, probs = [], None
        done = torch.zeros(len(questions), dtype=torch.bool)
        eos = self.processor.tokenizer.eos_token_id
        for step in range(self.max_new_tokens):
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).logits[:, -1]
            if step == 0:
                p = logits.float().softmax(-1)
                yn = p[:, self.yes_no]
                probs = torch.cat([yn, (1 - yn.sum(-1, keepdim=True)).clamp(min=0)], -1)
            nxt = logits.argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
            out_tokens.append(nxt)
            done |= nxt == eos
            if bool(done.all()):
                break
            emb = lm.get_input_embeddings()(nxt).unsqueeze(1).to(embeds.dtype)
            embeds = torch.cat([embeds, emb], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        tokens = torch.stack(out_tokens, 1)
        texts = self.processor.tokenizer.batch_decode(tokens, skip_special_tokens=True)
        return [t.strip() for t in texts], probs.numpy()


def evaluate_samples(adapter: VLMAdapter, samples: Sequence, batch_size: int = 100,
                     with_suffix: bool = False) -> EvalResult:
    """Ask every question of every sample (``synthetic.Sample``-like) and score the answers."""
    start = time.perf_counter()
    flat = [(s, q) for s in samples for q in s.questions]
    records = []
    for i in range(0, len(flat), batch_size):
        chunk = flat[i : i + batch_size]
        texts, probs = adapter.answer(
            [s.image for s, _ in chunk],
            [q.text + (PROMPT_SUFFIX if with_suffix else "") for _, q in chunk],
        )
        for (s, q), text, p in zip(chunk, texts, probs, strict=True):
            records.append({"question_id": s.image_id, "category": s.category,
                            "question": q.text, "answer": q.answer, "prediction": text,
                            "probs": [float(x) for x in p]})
    result = score_mme(records)
    result.elapsed_s = time.perf_counter() - start
    return result
