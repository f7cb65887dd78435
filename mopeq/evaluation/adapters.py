"""Model adapters for MME: one small interface (``answer(images, questions)``) per model family.

A quantized model goes through exactly the same adapter as its baseline. ``adapter_for`` picks
the adapter of a ``LoadedModel``: the embedded tiny VLM, a transformers VLM, or the one a
``mopeq.model.archs`` model brings.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch

from mopeq.core.errors import MopeqError


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
                probs = yes_no_other(logits, [self.yes_no[0]], [self.yes_no[1]])
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


def yes_no_other(logits: torch.Tensor, yes_ids: Sequence[int],
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
            raise MopeqError(f"{type(model).__name__} has no vision tower: a causal-LM-only "
                             "model cannot be evaluated on images; pass a vision-language model")
        if processor is None or getattr(processor, "image_processor", None) is None:
            raise MopeqError("the model's processor cannot prepare images (got "
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
            raise MopeqError("the processor has neither a chat template nor an image token")
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
        return [t.strip() for t in texts], yes_no_other(out.logits[0], self.yes_ids, self.no_ids)


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
        MopeqError: for a causal language model (no vision tower) or an unknown kind.
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
        raise MopeqError(f"{loaded.source} is a causal language model without a vision tower: "
                         "MME asks questions about images, so evaluate a vision-language model")
    raise MopeqError(f"cannot evaluate a model of kind {loaded.kind!r}")
