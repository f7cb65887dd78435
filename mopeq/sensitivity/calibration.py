"""Calibration data for data-aware sensitivity, the loss on it, and where its tokens are routed.

``calibration_batches`` builds a few batches of model inputs (with ``labels``) and a
``description`` that says exactly what they are (it enters the sensitivity cache key):

- the embedded tiny VLM: MME-style images and questions from its own training distribution
  (``synthetic.train_stream``), labels on the answer tokens only;
- a causal language model: windows of a local text file, or of the short English text built
  into this module (``BUILTIN_TEXT``), labels on every token;
- a Hugging Face VLM: synthetic images with their questions and answers through the model's
  processor and chat template, labels on every text token that is not padding or image.

Nothing here reaches the hub. Running a model on the data: ``batch_loss`` is the loss whose
Hessian (or Fisher) the sensitivity methods measure, ``expert_grad_mode`` makes the expert
weights the only trainable ones with kernels that support double backward, and
``route_counts`` counts the router's top-k assignments.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mopeq.core.errors import MopeqError
from mopeq.core.layout import MoELayout
from mopeq.embedded import scenes, synthetic
from mopeq.model.moe import text_config

DATA_VERSION = 1
IGNORE = -100
IMAGE_KEYS = ("pixel_values", "images")  # how transformers / model.archs processors pass images

BUILTIN_TEXT = """\
The harbour town woke slowly in winter. Fishing boats stayed tied to the stone quay, their
nets folded under canvas, and the only steady sound was the bell of the old church counting
the hours. Children walked to school along the sea wall, leaning into the wind, while their
parents opened shops that sold rope, bread, lamp oil and newspapers from the mainland.

Every few weeks a ferry brought letters, tools and visitors. The visitors usually asked the
same questions: how deep the harbour was, why the lighthouse was painted red instead of
white, and whether anyone still remembered the storm that had torn the roof off the market
hall. The answers changed a little each time they were told, which the townspeople thought
was the proper way for a story to stay alive.

In spring the work began again. Carpenters repaired the hulls, teachers took their classes
to count birds on the cliffs, and the baker started rising an hour earlier to feed the crews.
A small engineering firm rented the empty warehouse by the pier and filled it with machines
that measured wind, tide and the temperature of the water. Their young engineers explained
that a good measurement is a careful comparison: you must know what you are comparing with,
how large the error is, and which parts of the answer you can trust.

By summer the town was crowded. Musicians played on the steps of the library, the market
sold strawberries and smoked fish, and the evenings stayed bright until nearly midnight.
Yet the older residents still checked the sky each morning, read the barometer by the door,
and decided for themselves whether the day was fit for the sea. Numbers, they said, are
useful servants, but the weather has never read the forecast.
"""


@dataclass
class CalibData:
    """Calibration batches (dicts of model inputs incl. ``labels``) and what they are."""

    batches: list[dict]
    description: str

    @property
    def n_tokens(self) -> int:
        """Real (non-padding) tokens over all batches."""
        return int(sum(_token_mask(b).sum() for b in self.batches))


def calibration_batches(loaded_or_model, processor=None, n_batches: int = 4,
                        batch_size: int = 8, seed: int = 0, text_file: str | Path | None = None,
                        seq_len: int = 128) -> CalibData:
    """Build calibration data for a model (a ``LoadedModel`` or a bare ``nn.Module``).

    Args:
        loaded_or_model: the model, or a ``mopeq.model.loading.LoadedModel`` (its processor is used
            when ``processor`` is None).
        processor: the tiny VLM processor, a tokenizer, or a VLM processor.
        n_batches: number of batches.
        batch_size: images per batch (tiny VLM: two question rows per image; VLM: one row per
            image) or text windows per batch (causal LM).
        seed: picks the samples / text windows.
        text_file: a local UTF-8 text file for causal LMs (default: ``BUILTIN_TEXT``).
        seq_len: tokens per text window (capped by the model's maximum positions).

    Raises:
        MopeqError: for a VLM without a processor that has a chat template.
    """
    model, kind = _model_and_kind(loaded_or_model)
    if processor is None:
        processor = getattr(loaded_or_model, "processor", None)
    if kind == "tiny_vlm":
        return _tiny_vlm_data(model, processor, n_batches, batch_size, seed)
    if kind == "vlm":
        return _vlm_data(processor, n_batches, batch_size, seed)
    return _text_data(model, processor, n_batches, batch_size, seed, text_file, seq_len)


def _model_and_kind(obj) -> tuple[nn.Module, str]:
    from mopeq.embedded import tiny

    model = getattr(obj, "model", obj) if not isinstance(obj, nn.Module) else obj
    if isinstance(model, tiny.TinyMoEVLM):
        return model, "tiny_vlm"
    kind = getattr(obj, "kind", None)
    if kind is None:
        kind = "vlm" if hasattr(getattr(model, "config", None), "vision_config") else "causal_lm"
    return model, kind


def _samples(n: int, seed: int) -> list[scenes.Sample]:
    stream = synthetic.train_stream(seed=seed)
    return [next(stream) for _ in range(n)]


# ----------------------------------------------------------------------------- tiny VLM


def _tiny_vlm_data(model, processor, n_batches, batch_size, seed) -> CalibData:
    from mopeq.embedded import tiny

    if processor is None:
        processor = tiny.processor_for(model)
    samples = _samples(n_batches * batch_size, seed)
    batches = [_tiny_vlm_batch(samples[i * batch_size:(i + 1) * batch_size], processor)
               for i in range(n_batches)]
    desc = (f"tiny_vlm:train_stream(seed={seed}):{n_batches}x{batch_size} images x 2 questions:"
            f"answer-token labels:v{DATA_VERSION}")
    return CalibData(batches, desc)


def _tiny_vlm_batch(samples, processor) -> dict:
    """Left-padded ``prompt + answer + eos`` rows (as at inference), labels on the answer."""
    from mopeq.embedded import tiny

    tok = processor.tokenizer
    rows, labels, images = [], [], []
    for s in samples:
        for q in s.questions:
            prompt = processor.prompt_ids(q.text)
            answer = tok(q.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            rows.append(prompt + answer)
            labels.append([IGNORE] * len(prompt) + answer)
            images.append(s.image)
    ids, mask, lab = _left_pad(rows, labels, tok.pad_token_id)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": tiny.pixel_values(images),
            "labels": lab}


def _left_pad(rows, labels, pad_id) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    lab = torch.full_like(ids, IGNORE)
    mask = torch.zeros_like(ids)
    for i, (r, lb) in enumerate(zip(rows, labels, strict=True)):
        ids[i, width - len(r):] = torch.tensor(r)
        lab[i, width - len(lb):] = torch.tensor(lb)
        mask[i, width - len(r):] = 1
    return ids, mask, lab


# ----------------------------------------------------------------------------- text


def _text_data(model, tokenizer, n_batches, batch_size, seed, text_file, seq_len) -> CalibData:
    text, source = ((Path(text_file).read_text(encoding="utf-8"), Path(text_file).name)
                    if text_file else (BUILTIN_TEXT, "builtin"))
    ids, tok_name = _tokenize(text, getattr(tokenizer, "tokenizer", tokenizer), model)
    max_pos = getattr(text_config(model.config), "max_position_embeddings", None) or seq_len
    seq_len = max(2, min(seq_len, max_pos, len(ids)))
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(ids) - seq_len + 1, size=n_batches * batch_size)
    windows = torch.stack([ids[s:s + seq_len] for s in starts])
    batches = [{"input_ids": w, "attention_mask": torch.ones_like(w), "labels": w.clone()}
               for w in windows.split(batch_size)]
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    desc = (f"text:{source}:sha256={digest}:tokenizer={tok_name}:"
            f"{n_batches}x{batch_size}x{seq_len}:seed={seed}:v{DATA_VERSION}")
    return CalibData(batches, desc)


def _embedding_rows(model) -> int | None:
    try:
        emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):  # not a transformers model, or no embedding
        return None
    return getattr(emb, "num_embeddings", None)


def _tokenize(text: str, tokenizer, model) -> tuple[torch.Tensor, str]:
    """Token ids of ``text``; without a tokenizer, UTF-8 bytes modulo the vocabulary size."""
    if tokenizer is not None:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        path = getattr(tokenizer, "name_or_path", "")
        name = f"{type(tokenizer).__name__}({path},{len(tokenizer)})"
        rows = _embedding_rows(model)
        if rows is not None and ids and max(ids) >= rows:
            raise MopeqError(f"the tokenizer ({name}) yields token ids up to {max(ids)}, but "
                             f"the model's input embedding has {rows} rows: the tokenizer "
                             "does not belong to this model")
        return torch.tensor(ids, dtype=torch.long), name
    vocab = text_config(model.config).vocab_size
    return torch.tensor(list(text.encode()), dtype=torch.long) % vocab, f"bytes%{vocab}"


# ----------------------------------------------------------------------------- VLM


def _vlm_data(processor, n_batches, batch_size, seed) -> CalibData:
    native = hasattr(processor, "calibration_batch")  # mopeq.model.archs processors
    if not native and not hasattr(processor, "apply_chat_template"):
        raise MopeqError("VLM calibration needs the model's processor with a chat template "
                         "(load the model with mopeq.model.loading.load_model)")
    samples = _samples(n_batches * batch_size, seed)
    make = _native_vlm_batch if native else _vlm_batch
    batches = [make(samples[i * batch_size:(i + 1) * batch_size], processor)
               for i in range(n_batches)]
    for b in batches:
        if not any(k in b for k in IMAGE_KEYS):
            raise MopeqError(f"a VLM calibration batch holds no image (keys {sorted(b)}): "
                             f"{type(processor).__name__} has no image processor; add the "
                             f"model's processor files (preprocessor_config.json) to its folder")
    desc = (f"vlm:train_stream(seed={seed}):{n_batches}x{batch_size} images x 2 questions:"
            f"processor={type(processor).__name__}:text labels:v{DATA_VERSION}")
    return CalibData(batches, desc)


def _native_vlm_batch(samples, processor) -> dict:
    """One row per question through a native processor's own prompt format and labels."""
    flat = [(s.image, q) for s in samples for q in s.questions]
    return processor.calibration_batch([im for im, _ in flat], [q.text for _, q in flat],
                                       [q.answer for _, q in flat])


def _vlm_batch(samples, processor) -> dict:
    """One chat per question (with its answer) through the processor's chat template.

    Labels are on every text token that is not padding or an image token.
    """
    texts, images = [], []
    for s in samples:
        for q in s.questions:
            user = [{"type": "image"}, {"type": "text", "text": q.text}]
            chat = [{"role": "user", "content": user},
                    {"role": "assistant", "content": [{"type": "text", "text": q.answer}]}]
            texts.append(processor.apply_chat_template(chat, tokenize=False))
            images.append(s.image)
    inputs = dict(processor(images=images, text=texts, return_tensors="pt", padding=True))
    labels = inputs["input_ids"].clone()
    labels[inputs["attention_mask"] == 0] = IGNORE
    image_id = getattr(processor, "image_token_id", None)
    if image_id is not None:
        labels[labels == image_id] = IGNORE
    inputs["labels"] = labels
    return inputs


# ----------------------------------------------------------------------------- running


def model_inputs(batch: dict) -> dict:
    """The batch without ``labels`` (the loss is computed here, not by the model)."""
    return {k: v for k, v in batch.items() if k != "labels"}


def batch_loss(model: nn.Module, batch: dict, loss: str = "ce") -> torch.Tensor:
    """Mean loss over the labelled next-token positions of one batch.

    ``ce`` is the cross-entropy of the labels; ``self_kl`` is ``KL(p_detached || p)`` of the
    model's own next-token distribution at the same positions (label-free; its value and
    gradient are zero at the model, its Hessian is the Fisher information).
    """
    logits = model(**model_inputs(batch), use_cache=False).logits[:, :-1]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE
    if loss == "ce":
        return F.cross_entropy(logits[keep], labels[keep])
    logp = logits[keep].log_softmax(-1)
    ref = logp.detach()
    return (ref.exp() * (ref - logp)).sum(-1).mean()


def _token_mask(batch: dict) -> torch.Tensor:
    mask = batch.get("attention_mask")
    return mask.bool() if mask is not None else torch.ones_like(batch["input_ids"], dtype=bool)


def top_k_index(output, top_k: int | None) -> torch.Tensor:
    """The chosen experts [tokens, k] from a router's output.

    transformers 5.x routers return ``(logits, weights, indices)``; a plain ``nn.Linear`` gate
    returns logits, of which the ``top_k`` largest are taken.
    """
    if isinstance(output, tuple):
        ints = [t for t in output if torch.is_tensor(t) and not t.is_floating_point()]
        if ints:
            return ints[-1].reshape(-1, ints[-1].shape[-1])
        output = output[0]
    if top_k is None:
        raise MopeqError("router returns logits but the layout has no top_k")
    return output.reshape(-1, output.shape[-1]).topk(top_k, dim=-1).indices


@contextmanager
def eval_kernels(model: nn.Module, dtype: torch.dtype):
    """Eval mode, expert kernels that accept ``dtype``, double-backward-safe attention.

    transformers' grouped_mm experts are fp32-only (eager is used otherwise); the MATH SDPA
    backend is the one with a double backward on CPU. Everything is restored afterwards.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    training = model.training
    impls = _set_experts_impl(model, "grouped_mm" if dtype == torch.float32 else "eager")
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield model.eval()
    finally:
        for module, impl in impls:
            module.set_experts_implementation(impl)
        model.train(training)


def _set_experts_impl(model: nn.Module, impl: str) -> list[tuple[nn.Module, str]]:
    """Switch every sub-model that supports it; return (module, previous) to restore."""
    changed = []
    for module in model.modules():
        previous = getattr(getattr(module, "config", None), "_experts_implementation", None)
        settable = hasattr(module, "set_experts_implementation")
        if previous is None or previous == impl or not settable:
            continue
        try:
            module.set_experts_implementation(impl)
            changed.append((module, previous))
        except (ValueError, ImportError, RuntimeError):
            continue  # a wrapper without its own experts (e.g. a VLM around its LM)
    return changed


@contextmanager
def expert_grad_mode(model: nn.Module, params: list[torch.Tensor]):
    """Gradients on ``params`` only, under ``eval_kernels``; ``requires_grad`` restored."""
    saved = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in saved:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        with eval_kernels(model, params[0].dtype), torch.enable_grad():
            yield
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)


def route_counts(model: nn.Module, layout: MoELayout, batches: list[dict],
                 on_batch: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k assignments per (MoE layer, expert) over real tokens, and tokens per layer.

    Hooks each block's router (``layout.blocks[i].router_path``); padding is not counted.

    Raises:
        MopeqError: if a block has no router module to hook.
    """
    counts = np.zeros((layout.num_moe_layers, layout.num_experts), dtype=np.int64)
    tokens = np.zeros(layout.num_moe_layers, dtype=np.int64)
    state = {}
    handles = [router_module(model, b).register_forward_hook(
        _counter(row, layout, counts, tokens, state)) for row, b in enumerate(layout.blocks)]
    dtype = next(model.get_submodule(layout.blocks[0].experts_path).parameters()).dtype
    try:
        with torch.no_grad(), eval_kernels(model, dtype):
            for k, batch in enumerate(batches):
                state["mask"] = _token_mask(batch).reshape(-1)
                model(**model_inputs(batch), use_cache=False)
                if on_batch:
                    on_batch(k)
    finally:
        for h in handles:
            h.remove()
    return counts, tokens


def router_module(model: nn.Module, block) -> nn.Module:
    """The router of an MoE block, where routing hooks attach (MopeqError if it has none)."""
    if block.router_path is None:
        raise MopeqError(f"MoE block {block.path} has no router module to hook; add its "
                         "attribute name to mopeq.model.moe.ARCHS")
    return model.get_submodule(block.router_path)


def _counter(row, layout, counts, tokens, state):
    def hook(_module, _inputs, output):
        idx = top_k_index(output, layout.top_k)
        mask = state.get("mask")
        if mask is not None and mask.numel() == idx.shape[0]:
            idx = idx[mask]
        counts[row] += np.bincount(idx.reshape(-1).cpu().numpy(), minlength=counts.shape[1])
        tokens[row] += idx.shape[0]
    return hook
