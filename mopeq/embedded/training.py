"""Train the embedded tiny VLM from a ``TinyRecipe`` (``mopeq train-tiny`` reproduces the weights).

Each step sees a batch of synthetic images: the answer loss, caption loss, vision auxiliaries
(per-cell shape and colour, the word) and the router balance loss; phases follow a
warmup-stable-decay schedule, and a validation split (``VALIDATION_SEED``) draws the curve.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from mopeq.core.errors import MopeqError
from mopeq.embedded import outliers, scenes, synthetic
from mopeq.embedded.tiny import (
    VALIDATION_SEED,
    Phase,
    TinyMoEVLM,
    TinyRecipe,
    TinyVLMProcessor,
    load,
    new_model,
    pixel_values,
    save,
)


def _scene_targets(samples: Sequence[scenes.Sample], grid: int) -> tuple[torch.Tensor, ...]:
    """Per-cell shape/colour classes and the word class of each sample (0 = none)."""
    shapes = torch.zeros((len(samples), grid * grid), dtype=torch.long)
    colors = torch.zeros_like(shapes)
    words = torch.zeros(len(samples), dtype=torch.long)
    color_names = list(scenes.COLORS)
    texts = scenes.text_classes()
    for i, s in enumerate(samples):
        for o in s.scene.objects:
            shapes[i, o.row * grid + o.col] = scenes.SHAPES.index(o.shape) + 1
            colors[i, o.row * grid + o.col] = color_names.index(o.color) + 1
        if s.scene.text:
            words[i] = texts.index(s.scene.text) + 1
    return shapes, colors, words


def _training_batch(samples, processor: TinyVLMProcessor) -> dict:
    """Right-padded sequences: both questions of every image, then its caption."""
    tok = processor.tokenizer
    rows, labels, image_index = [], [], []
    describe = tok.convert_tokens_to_ids("<describe>")
    for i, s in enumerate(samples):
        for q in s.questions:
            prompt = processor.prompt_ids(q.text)
            answer = tok(q.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            rows.append(prompt + answer)
            labels.append([-100] * len(prompt) + answer)
            image_index.append(i)
        cap = tok(s.caption, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        prompt = [tok.bos_token_id, describe, *[processor.image_id] * processor.num_image_tokens,
                  processor.answer_id]
        rows.append(prompt + cap)
        labels.append([-200] * len(prompt) + cap)  # -200 marks caption positions (weighted)
        image_index.append(i)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    lab = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for j, (r, lb) in enumerate(zip(rows, labels, strict=True)):
        ids[j, : len(r)] = torch.tensor(r)
        lab[j, : len(lb)] = torch.tensor(lb)
        mask[j, : len(r)] = 1
    is_caption = torch.tensor([k % 3 == 2 for k in range(len(rows))])
    return {"input_ids": ids, "labels": lab, "attention_mask": mask,
            "image_index": torch.tensor(image_index), "is_caption": is_caption}


class PositionTargets(NamedTuple):
    """The probes' targets, one entry per ``position`` question of a batch (aligned).

    ``rows``: its row in the batch; ``relation``: whether its first object comes first along
    the asked axis (1/0); ``at`` (n, 2): where each of its two objects' shape is named after
    the image; ``cells`` (n, 2): each object's cell, row-major.
    """

    rows: torch.Tensor
    relation: torch.Tensor
    at: torch.Tensor
    cells: torch.Tensor


def _position_targets(samples, batch: dict, processor: TinyVLMProcessor) -> PositionTargets:
    """Walk the batch's question rows once; keep the relation questions of two objects.

    The axis is the column for left/right, the row for above/below. The answer to a
    ``position`` question is the relation fact XOR the relation word; as its own target
    (``Phase.probes`` "relation") the fact gets a first-order signal, and each object's cell
    ("cells", "gather") one for finding it.
    """
    tok = processor.tokenizer
    rows, relation, at, cells = [], [], [], []
    question_rows = (~batch["is_caption"]).nonzero().squeeze(1).tolist()
    questions = [(s, q) for s in samples for q in s.questions]
    for row, (s, q) in zip(question_rows, questions, strict=True):
        words = set(q.text.rstrip("?").lower().split())
        word = next((r for r in scenes.RELATIONS if r in words), None)
        if s.category != "position" or word is None or len(s.scene.objects) < 2:
            continue
        axis = scenes.RELATIONS[word][0]
        a, b = s.scene.objects[0], s.scene.objects[1]
        ids = batch["input_ids"][row].tolist()
        i = max(j for j, t in enumerate(ids) if t == processor.image_id)
        named = []
        for obj in (a, b):
            i = ids.index(tok.convert_tokens_to_ids(obj.shape), i + 1)
            named.append(i)
        rows.append(row)
        relation.append(int(getattr(a, axis) < getattr(b, axis)))
        at.append(named)
        cells.append([o.row * scenes.GRID + o.col for o in (a, b)])
    long = torch.long
    return PositionTargets(torch.tensor(rows, dtype=long), torch.tensor(relation, dtype=long),
                           torch.tensor(at, dtype=long).view(-1, 2),
                           torch.tensor(cells, dtype=long).view(-1, 2))


PROBES = ("relation", "cells", "gather")


def position_heads(recipe: TinyRecipe) -> torch.nn.ModuleDict | None:
    """Training-only probes for ``position`` questions (not saved with the model).

    ``relation`` reads, at the answer token, whether the first object comes first along the
    asked axis; ``cells`` reads, at each object's name after the image, which cell it is in;
    ``gather_a``/``gather_b`` read both cells again at the answer token. Each is a first-order
    target for one step of what the answer needs (find each object, compare, then flip by the
    question's word). Their inputs are normalised first: the residual stream is not (norms of
    30-160 in the trained model). None when no phase uses them; built without touching the
    global random state, so the phases before them train exactly as without.
    """
    unknown = {k for p in recipe.phases for k, _ in p.probes} - set(PROBES)
    if unknown:
        raise MopeqError(f"unknown probes {sorted(unknown)}; a phase can use {list(PROBES)}")
    if not any(w for p in recipe.phases for _, w in p.probes):
        return None
    layers = recipe.probe_layers()
    if not all(0 <= n <= recipe.num_layers for n in layers):
        raise MopeqError(f"probe layers {layers} must lie within 0..{recipe.num_layers} "
                         "(the hidden states of a model with that many layers)")
    h, cells = recipe.hidden_size, scenes.GRID ** 2

    def probe(n):
        return torch.nn.Sequential(torch.nn.LayerNorm(h), torch.nn.Linear(h, n))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed + 7)
        return torch.nn.ModuleDict({"relation": probe(2), "cells": probe(cells),
                                    "gather_a": probe(cells), "gather_b": probe(cells)})


def add_position_code(model: TinyMoEVLM, scale: float) -> None:
    """Add ``scale`` x one-hot(row) and x one-hot(column) to the vision position embedding.

    Channel ``row`` and channel ``grid + column`` of each cell's entry; rounded to bf16, as a
    checkpoint holds it. It says which cell a token is in as loudly as its features speak
    (the trained embedding is ~2.5 in norm against ~19 for the features).
    """
    with torch.no_grad():
        pos, grid = model.vision_tower.pos, model.config.grid
        for k in range(grid * grid):
            pos[k, k // grid] += scale
            pos[k, grid + k % grid] += scale
        pos.copy_(pos.to(torch.bfloat16).float())


def _router_balance_loss(router_logits: Sequence[torch.Tensor], top_k: int) -> torch.Tensor:
    """Switch-style load-balancing loss, averaged over MoE layers."""
    total = 0.0
    for logits in router_logits:
        probs = logits.float().softmax(-1)
        chosen = torch.zeros_like(probs).scatter_(1, probs.topk(top_k, -1).indices, 1.0)
        total = total + probs.shape[-1] * (chosen.mean(0) / top_k * probs.mean(0)).sum()
    return total / max(len(router_logits), 1)


def _lr_factor(step: int, phase: Phase) -> float:
    if step < phase.warmup:
        return (step + 1) / phase.warmup
    decay_start = int(phase.steps * (1 - phase.decay_fraction))
    if step < decay_start:
        return 1.0
    return max(0.0, (phase.steps - step) / max(phase.steps - decay_start, 1))


def training_step(model: TinyMoEVLM, processor, samples, recipe: TinyRecipe,
                  heads: torch.nn.ModuleDict | None = None,
                  probe_weights: dict[str, float] | None = None) -> dict:
    """Loss of one batch: answers + weighted captions + vision auxiliaries + router balance.

    With ``heads`` (``position_heads``) and ``probe_weights`` (``Phase.probes``), also the
    probes of ``position`` questions.
    """
    probe_weights = {k: w for k, w in (probe_weights or {}).items() if w}
    if not probe_weights:
        heads = None
    batch = _training_batch(samples, processor)
    images = pixel_values([s.image for s in samples])
    feats = model.vision_tower(images)
    vision = model.projector(feats)
    embeds = model.language_model.get_input_embeddings()(batch["input_ids"])
    per_row = vision[batch["image_index"]]
    mask = batch["input_ids"] == model.config.image_token_id
    embeds = embeds.masked_scatter(mask.unsqueeze(-1), per_row.reshape(-1, per_row.shape[-1]))
    out = model.language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                               output_router_logits=True, output_hidden_states=heads is not None)
    logits = out.logits[:, :-1]
    labels = batch["labels"][:, 1:]
    caption_pos = labels == -200
    labels = labels.masked_fill(caption_pos, -100)
    tok_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                               ignore_index=-100, reduction="none").view(labels.shape)
    answer_mask = (labels != -100) & ~batch["is_caption"].unsqueeze(1)
    caption_mask = (labels != -100) & batch["is_caption"].unsqueeze(1)
    answer_loss = tok_loss[answer_mask].mean()
    caption_loss = tok_loss[caption_mask].mean() if caption_mask.any() else answer_loss * 0
    shapes, colors, words = _scene_targets(samples, model.config.grid)
    vt = model.vision_tower
    aux = (F.cross_entropy(vt.aux_shape(feats).flatten(0, 1), shapes.flatten())
           + F.cross_entropy(vt.aux_color(feats).flatten(0, 1), colors.flatten())
           + F.cross_entropy(vt.aux_word(feats.mean(1)), words))
    balance = _router_balance_loss(out.router_logits, recipe.top_k)
    loss = (answer_loss + recipe.caption_weight * caption_loss + recipe.aux_weight * aux
            + recipe.router_aux_weight * balance)
    losses = {"answer": answer_loss.detach(), "caption": caption_loss.detach(),
              "aux": aux.detach(), "balance": balance.detach()}
    if heads is not None:
        extra = _position_losses(out, batch, samples, processor, recipe, heads,
                                 gather="gather" in probe_weights)
        loss = loss + sum(w * extra[k] for k, w in probe_weights.items())
        losses.update({k: v.detach() for k, v in extra.items()})
    return {"loss": loss, **losses}


def _position_losses(out, batch, samples, processor, recipe, heads, gather: bool) -> dict:
    """Cross-entropies of the ``position_heads`` on this batch (0 without position images)."""
    zero = out.logits.sum() * 0
    losses = {"relation": zero, "cells": zero, **({"gather": zero} if gather else {})}
    t = _position_targets(samples, batch, processor)
    if not len(t.rows):
        return losses
    answer_at = (batch["input_ids"][t.rows] == processor.answer_id).int().argmax(1)
    relation_layer, object_layer, gather_layer = recipe.probe_layers()
    hidden = out.hidden_states[relation_layer][t.rows, answer_at]
    losses["relation"] = F.cross_entropy(heads["relation"](hidden), t.relation)
    hidden = out.hidden_states[object_layer][t.rows.repeat_interleave(2), t.at.flatten()]
    losses["cells"] = F.cross_entropy(heads["cells"](hidden), t.cells.flatten())
    if gather:  # both objects' cells, read again at the answer token
        hidden = out.hidden_states[gather_layer][t.rows, answer_at]
        losses["gather"] = (F.cross_entropy(heads["gather_a"](hidden), t.cells[:, 0])
                            + F.cross_entropy(heads["gather_b"](hidden), t.cells[:, 1])) / 2
    return losses


def train(out_dir: str | Path, recipe: TinyRecipe = TinyRecipe(), minutes: float | None = None,
          eval_every: int = 500, eval_pairs: int = 40, init_from: str | Path | None = None,
          start_phase: int = 0, checkpoint_every: int | None = None, report_every: int = 50,
          on_progress: Callable[[float, str], None] | None = None) -> dict:
    """Train the tiny VLM phase by phase (fixed step counts); save it; return the log.

    Between phases the weights are rounded to bf16, exactly as a saved checkpoint holds them,
    so resuming from a saved phase (``init_from`` + ``start_phase``) reproduces a full run.
    ``minutes`` caps the wall time of a phase (the log then says it stopped early). The
    curve is measured on a *validation* split (``VALIDATION_SEED``), never on the held-out
    split the bar is measured on, so choosing a checkpoint by it does not peek at the test
    data. ``checkpoint_every`` saves ``out_dir/checkpoints/step-N`` along the way. After the
    last phase, ``recipe.channel_exponents`` gives the experts' inputs outlier channels
    (``embedded.outliers``: an exact rescale, the 16-bit answers do not change); a model whose
    config records it already is left as it is.
    """
    if init_from is not None:
        model, processor = load(init_from)
        prior = Path(init_from, "training_log.json")
        log = json.loads(prior.read_text()) if prior.exists() else {"curve": []}
    else:
        model, processor = new_model(recipe)
        log = {"curve": []}
    log.update(recipe=asdict(recipe), stopped_early=False)
    if recipe.channel_exponents:  # refuse now, not after the training, if it cannot apply
        outliers.check(model.language_model)
    model.language_model.set_experts_implementation("grouped_mm")
    quick = synthetic.eval_split(eval_pairs, seed=VALIDATION_SEED)
    ctx = {"processor": processor, "quick": quick, "eval_every": eval_every, "log": log,
           "on_progress": on_progress, "minutes": minutes, "out_dir": Path(out_dir),
           "checkpoint_every": checkpoint_every, "report_every": report_every,
           "heads": position_heads(recipe)}
    if on_progress:
        on_progress(0, f"training {sum(p.numel() for p in model.parameters()):,} parameters, "
                       f"{sum(p.steps for p in recipe.phases[start_phase:])} steps")
    for index, phase in enumerate(recipe.phases[start_phase:], start=start_phase):
        _run_phase(model, recipe, phase, index, ctx)
        with torch.no_grad():  # what a checkpoint between phases would hold
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16).float())
    if outliers.apply_to(model, recipe.channel_exponents, recipe.channel_seed):
        log["channel_gains"] = model.config.channel_gains
        if on_progress:
            on_progress(0, f"outlier channels at the experts' inputs: {log['channel_gains']}")
    save(model.eval(), processor, out_dir)
    Path(out_dir, "training_log.json").write_text(json.dumps(log, indent=1))
    return log


def _run_phase(model: TinyMoEVLM, recipe: TinyRecipe, phase: Phase, index: int, ctx) -> None:
    if phase.repeat_question is not None:
        model.config.repeat_question = ctx["processor"].repeat_question = phase.repeat_question
    weights = dict(phase.weights) if phase.weights else None
    stream = synthetic.train_stream(seed=recipe.seed + phase.stream_seed, weights=weights)
    if phase.position_code:
        add_position_code(model, phase.position_code)
    probe_weights = dict(phase.probes)
    heads = ctx["heads"] if any(probe_weights.values()) else None
    params = [*model.parameters(), *(heads.parameters() if heads is not None else ())]
    opt = torch.optim.AdamW(params, lr=phase.lr, weight_decay=recipe.weight_decay)
    last = phase.stop_at or phase.steps
    start = time.perf_counter()
    for step in range(last):
        for group in opt.param_groups:
            group["lr"] = phase.lr * _lr_factor(step, phase)
        model.train()
        losses = training_step(model, ctx["processor"],
                               [next(stream) for _ in range(recipe.batch_images)], recipe, heads,
                               probe_weights)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        elapsed = (time.perf_counter() - start) / 60
        capped = ctx["minutes"] is not None and elapsed > ctx["minutes"]
        if (step + 1) % ctx["eval_every"] == 0 or step + 1 == last or capped:
            _log_point(model, ctx, index, step + 1, elapsed, losses)
        elif ctx["on_progress"] and (step + 1) % ctx["report_every"] == 0:
            loss = float(losses["loss"].detach())
            ctx["on_progress"](step + 1, f"phase {index} step {step + 1}/{last} "
                                         f"{elapsed:.1f} min loss {loss:.3f}")
        every = ctx["checkpoint_every"]
        if every and (step + 1) % every == 0 and step + 1 != last:
            save(model.eval(), ctx["processor"],
                 ctx["out_dir"] / "checkpoints" / f"phase{index}-step{step + 1}")
        if capped:
            ctx["log"]["stopped_early"] = True
            ctx["log"].setdefault("stopped_at", {})[str(index)] = step + 1
            return


def _log_point(model, ctx, phase: int, step: int, minutes: float, losses: dict) -> None:
    from mopeq.evaluation.adapters import TinyVLMAdapter
    from mopeq.evaluation.evaluate import evaluate_samples

    result = evaluate_samples(TinyVLMAdapter(model.eval(), ctx["processor"]), ctx["quick"])
    point = {"phase": phase, "step": step, "minutes": round(minutes, 2),
             **{k: round(float(v.detach()), 4) for k, v in losses.items()},
             "score": round(result.score, 1),
             "per_category": {c: round(v["score"], 1) for c, v in result.per_category.items()}}
    ctx["log"]["curve"].append(point)
    if ctx["on_progress"]:
        ctx["on_progress"](step, json.dumps(point))
