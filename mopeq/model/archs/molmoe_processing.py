"""Molmo's image processing and prompt format, and the MME adapter for a native MolmoE.

Image processing follows the authors' processor (``image_preprocessing_molmo.py``):

- the image is tiled into up to ``max_crops`` crops of ``base`` pixels that overlap by
  ``overlap_margins`` patches; the tiling is the one needing the least up-scaling (or, if every
  tiling must shrink the image, the least down-scaling) of the image without the margins;
- the image is resized to fit the tiling (bilinear, antialiased, in float32; aspect kept,
  zero padding centred), normalised with the CLIP mean/std, and cut into the crops; a global
  view (the whole image resized to one crop) goes first;
- tokens: ``<im_start>``, rows of ``<im_patch>`` each closed by ``<im_col>``, ``<im_end>`` -
  one block for the global view (12 x 12 after 2x2 pooling) and one for the crops, whose pooled
  patches without the overlap margins tile the whole image in reading order;
- ``image_input_idx`` maps each pooled patch of each crop to its ``<im_patch>`` token;
  ``image_masks`` is the share of real (not padding) pixels in each patch, laid out as the
  authors' code lays it out (the crops' masks, then a row of -1).

The prompt is the model card's: a BOS (the tokenizer's EOS), the image tokens, then
``" User: {question} Assistant:"``. Calibration rows add ``" {answer}"`` and EOS, with labels
on the answer and EOS only (the authors train on the response).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mopeq.core.errors import MopeqError
from mopeq.model.archs.molmoe_weights import EXTRA_TOKENS, special_token_ids

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IGNORE = -100


@dataclass(frozen=True)
class CropSettings:
    """The authors' image-processor settings (``preprocessor_config.json``)."""

    max_crops: int = 12
    overlap_margins: tuple[int, int] = (4, 4)
    base_image_input_size: tuple[int, int] = (336, 336)
    image_patch_size: int = 14
    image_token_length_w: int = 12
    image_token_length_h: int = 12
    image_padding_mask: bool = True

    @classmethod
    def from_json(cls, d: dict) -> CropSettings:
        """From a ``preprocessor_config.json`` dict (unknown keys ignored)."""
        keep = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()
                if k in cls.__dataclass_fields__}
        return cls(**keep)


def select_tiling(h: float, w: float, window: int, max_crops: int) -> tuple[int, int]:
    """(rows, cols) of crops for an image of ``h`` x ``w`` pixels (margins already removed).

    Candidates are all rows x cols <= ``max_crops``, ties going to fewer crops, then fewer rows.
    """
    tilings = sorted(((i, j) for i in range(1, max_crops + 1) for j in range(1, max_crops + 1)
                      if i * j <= max_crops), key=lambda t: (t[0] * t[1], t[0]))
    res = np.array(tilings, dtype=np.float32) * window
    scale = (res / np.array([h, w], dtype=np.float32)).min(-1)  # to fit the image in each
    if np.all(scale < 1):
        return tilings[int(np.argmax(scale))]  # must shrink: shrink least
    return tilings[int(np.argmin(np.where(scale < 1.0, 10e9, scale)))]  # grow least


def resize_and_pad(image: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Fit a uint8 HxWx3 image in ``size`` (aspect kept, centred), normalised; and its mask."""
    out_h, out_w = size
    h, w = image.shape[:2]
    scale = min(np.float32(out_h) / np.float32(h), np.float32(out_w) / np.float32(w))
    sh, sw = int(np.float32(h) * scale), int(np.float32(w) * scale)
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255.0
    x = F.interpolate(x, size=(sh, sw), mode="bilinear", align_corners=False, antialias=True)
    x = x[0].clamp(0.0, 1.0).permute(1, 2, 0).numpy()
    top, left = (out_h - sh) // 2, (out_w - sw) // 2
    pad = [(top, out_h - sh - top), (left, out_w - sw - left)]
    mask = np.pad(np.ones((sh, sw), dtype=bool), pad)
    x = np.pad(x, pad + [(0, 0)])
    x = (x - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    return x.astype(np.float32), mask


def _patchify(x: np.ndarray, p: int) -> np.ndarray:
    """[..., H, W, C] -> [..., (H/p)*(W/p), p*p*C] in (row, col) x (dy, dx, c) order."""
    *lead, h, w, c = x.shape
    x = x.reshape(*lead, h // p, p, w // p, p, c)
    x = np.moveaxis(x, -3, -4)  # [..., H/p, W/p, p, p, C]
    return x.reshape(*lead, (h // p) * (w // p), p * p * c)


def image_inputs(image: np.ndarray, s: CropSettings, ids: dict[str, int]) -> dict:
    """Crops, tokens and token indices of one image (indices count from the first image token).

    Returns:
        dict with ``images`` [crops+1, patches, p*p*3], ``image_masks`` [crops+1, patches],
        ``tokens`` [n] and ``image_input_idx`` [crops+1, tokens per crop] (-100: none).
    """
    p, base = s.image_patch_size, s.base_image_input_size[0]
    left, right = s.overlap_margins
    side = base // p  # patches per crop side
    window = side - left - right  # patches of a crop that are not margin
    tw, th = s.image_token_length_w, s.image_token_length_h
    rows, cols = select_tiling(image.shape[0] - p * (left + right),
                               image.shape[1] - p * (left + right), window * p, s.max_crops)
    src, mask = resize_and_pad(image, (rows * window * p + p * (left + right),
                                       cols * window * p + p * (left + right)))

    def extent(i, n):  # first pooled row/col of crop i that is kept, and how many
        size = window + (left if i == 0 else 0) + (right if i == n - 1 else 0)
        return (0 if i == 0 else left // 2), (size + 1) // 2

    heights = [extent(i, rows) for i in range(rows)]
    widths = [extent(j, cols) for j in range(cols)]
    grid_w = sum(n for _, n in widths)  # pooled patches per row of the whole image
    crops, masks, idx = [], [], []
    for i, (y0, nh) in enumerate(heights):
        for j, (x0, nw) in enumerate(widths):
            ys, xs = i * window * p, j * window * p
            crops.append(src[ys:ys + base, xs:xs + base])
            masks.append(mask[ys:ys + base, xs:xs + base])
            slot = np.full((th, tw), IGNORE, dtype=np.int64)
            r0, c0 = sum(n for _, n in heights[:i]), sum(n for _, n in widths[:j])
            gr, gc = np.meshgrid(np.arange(r0, r0 + nh), np.arange(c0, c0 + nw), indexing="ij")
            slot[y0:y0 + nh, x0:x0 + nw] = gr * (grid_w + 1) + gc  # +1: <im_col> ends a row
            idx.append(slot.reshape(-1))
    glob, _ = resize_and_pad(image, s.base_image_input_size)
    patch, col = ids["<im_patch>"], ids["<im_col>"]
    start, end = ids["<im_start>"], ids["<im_end>"]
    global_block = [start] + ([patch] * tw + [col]) * th + [end]
    grid_h = sum(n for _, n in heights)
    crop_block = [start] + ([patch] * grid_w + [col]) * grid_h + [end]
    offset = len(global_block) + 1  # crop indices are within the crop block, after <im_start>
    crop_idx = [np.where(ix >= 0, ix + offset, IGNORE) for ix in idx]
    g = np.arange(th * tw)
    global_idx = 1 + (g // tw) * (tw + 1) + g % tw
    patch_mask = _patchify(np.stack(masks)[..., None].astype(np.float32), p).mean(-1)
    # the authors append the -1 row after the crops while the global view comes first
    image_masks = np.concatenate([patch_mask, -np.ones((1, side * side), np.float32)])
    return {"images": np.concatenate([_patchify(glob[None], p), _patchify(np.stack(crops), p)]),
            "image_masks": image_masks if s.image_padding_mask else None,
            "tokens": np.array(global_block + crop_block, dtype=np.int64),
            "image_input_idx": np.stack([global_idx] + crop_idx)}


def _rgb_array(image) -> np.ndarray:
    from PIL import Image, ImageOps

    if isinstance(image, Image.Image):
        return np.asarray(ImageOps.exif_transpose(image.convert("RGB")), dtype=np.uint8)
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise MopeqError(f"expected an RGB image (H, W, 3), got shape {arr.shape}")
    return arr.astype(np.uint8)


class MolmoeProcessor:
    """Tokenizer + Molmo image processing: prompts, batches, calibration rows, saving."""

    def __init__(self, tokenizer, settings: CropSettings = CropSettings()):
        self.tokenizer = tokenizer
        self.settings = settings
        self.special = special_token_ids(tokenizer)
        self.image_token_ids = [self.special[t] for t in EXTRA_TOKENS]
        self.eos = tokenizer.eos_token_id
        self.bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else self.eos

    @classmethod
    def from_folder(cls, path: str | Path) -> MolmoeProcessor:
        """Tokenizer files and ``preprocessor_config.json`` (defaults when absent)."""
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        path = Path(path)
        pre = path / "preprocessor_config.json"
        settings = CropSettings.from_json(json.loads(pre.read_text())) if pre.exists() \
            else CropSettings()
        # tokenizer.json directly: AutoTokenizer would read config.json and its auto_map
        tok = (PreTrainedTokenizerFast.from_pretrained(path) if (path / "tokenizer.json").exists()
               else AutoTokenizer.from_pretrained(path, trust_remote_code=False))
        return cls(tok, settings)

    def prompt(self, question: str) -> str:
        """The model card's format (``message_format="role"``, leading space)."""
        return " User: " + question + " Assistant:"

    def example(self, image, text_ids: Sequence[int]) -> dict:
        """One sequence: BOS, image tokens, text; image indices shifted past the BOS."""
        inputs = image_inputs(_rgb_array(image), self.settings, self.special)
        idx = inputs["image_input_idx"]
        inputs["image_input_idx"] = np.where(idx >= 0, idx + 1, idx)
        inputs["input_ids"] = np.concatenate([[self.bos], inputs.pop("tokens"), text_ids])
        return inputs

    def __call__(self, images: Sequence, questions: Sequence[str]) -> dict:
        """A left-padded batch for generation (one image per question)."""
        encode = self.tokenizer.encode
        rows = [self.example(im, encode(self.prompt(q), add_special_tokens=False))
                for im, q in zip(images, questions, strict=True)]
        return collate(rows)

    def calibration_batch(self, images: Sequence, questions: Sequence[str],
                          answers: Sequence[str]) -> dict:
        """Rows ``prompt + " answer" + EOS`` with labels on the answer and EOS."""
        rows = []
        for im, q, a in zip(images, questions, answers, strict=True):
            prompt = self.tokenizer.encode(self.prompt(q), add_special_tokens=False)
            answer = self.tokenizer.encode(" " + a, add_special_tokens=False) + [self.eos]
            row = self.example(im, prompt + answer)
            labels = np.full(len(row["input_ids"]), IGNORE, dtype=np.int64)
            labels[-len(answer):] = answer
            row["labels"] = labels
            rows.append(row)
        return collate(rows)

    def mme_adapter(self, model) -> MolmoeAdapter:
        """The evaluation adapter for ``model`` with this processor."""
        return MolmoeAdapter(model, self)

    def save_pretrained(self, folder: str | Path) -> None:
        """Tokenizer files, ``preprocessor_config.json`` and ``processor_config.json``."""
        folder = Path(folder)
        self.tokenizer.save_pretrained(folder)
        settings = {**asdict(self.settings), "image_mean": list(CLIP_MEAN),
                    "image_std": list(CLIP_STD), "do_normalize": True,
                    "image_processor_type": "MolmoImageProcessor"}
        (folder / "preprocessor_config.json").write_text(json.dumps(settings, indent=1))
        (folder / "processor_config.json").write_text(json.dumps(
            {"processor_class": "MolmoProcessor", "mopeq_native": "molmoe"}, indent=1))


def collate(rows: list[dict]) -> dict:
    """Left-pad token rows (-1), pad crops (-1) and indices; return torch tensors."""
    width = max(len(r["input_ids"]) for r in rows)
    crops = max(len(r["images"]) for r in rows)
    n = len(rows)
    first = rows[0]
    ids = np.full((n, width), -1, dtype=np.int64)
    images = np.full((n, crops, *first["images"].shape[1:]), -1, dtype=np.float32)
    idx = np.full((n, crops, first["image_input_idx"].shape[1]), -1, dtype=np.int64)
    masks = np.full((n, crops, first["images"].shape[1]), -1, dtype=np.float32)
    labels = np.full((n, width), IGNORE, dtype=np.int64) if "labels" in first else None
    for b, r in enumerate(rows):
        pad = width - len(r["input_ids"])
        ids[b, pad:] = r["input_ids"]
        k = len(r["images"])
        images[b, :k] = r["images"]
        idx[b, :k] = np.where(r["image_input_idx"] >= 0, r["image_input_idx"] + pad,
                              r["image_input_idx"])
        if r["image_masks"] is not None:
            masks[b, :k] = r["image_masks"]
        if labels is not None:
            labels[b, pad:] = r["labels"]
    out = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(
        (ids != -1).astype(np.int64)), "images": torch.from_numpy(images),
        "image_input_idx": torch.from_numpy(idx)}
    if first["image_masks"] is not None:
        out["image_masks"] = torch.from_numpy(masks)
    if labels is not None:
        out["labels"] = torch.from_numpy(labels)
    return out


class MolmoeAdapter:
    """Greedy answers of a native MolmoE through its own processor and prompt (KV-cached).

    MME questions are asked verbatim (they carry "Please answer yes or no."): the model card's
    format has no lmms-eval suffix. P(yes)/P(no) are the first step's mass on single-token
    spellings of Yes/yes and No/no.
    """

    with_suffix = False
    batch_size = 4

    def __init__(self, model, processor: MolmoeProcessor, max_new_tokens: int = 16):
        from mopeq.evaluation.adapters import answer_token_ids

        self.model, self.processor, self.max_new_tokens = model, processor, max_new_tokens
        tok = processor.tokenizer
        self.yes_ids = answer_token_ids(tok, ("Yes", "yes"))
        self.no_ids = answer_token_ids(tok, ("No", "no"))

    @torch.no_grad()
    def answer(self, images, questions):
        """Greedy-decode short answers for a batch of (image, question) pairs."""
        from mopeq.evaluation.adapters import yes_no_other

        batch = self.processor(images, questions)
        dtype = next(self.model.vision_tower.parameters()).dtype
        batch["images"] = batch["images"].to(dtype)
        mask = batch["attention_mask"]
        embeds = self.model.embed(batch["input_ids"], batch["images"], batch.get("image_masks"),
                                  batch["image_input_idx"])
        lm, cache, probs, tokens = self.model.language_model, None, None, []
        eos = self.processor.eos
        done = torch.zeros(len(questions), dtype=torch.bool)
        for step in range(self.max_new_tokens):
            pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -embeds.shape[1]:]
            out = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, cache=cache,
                     use_cache=True, logits_to_keep=1)
            cache = out.cache
            logits = out.logits[:, -1, : self.model.config.embedding_size]
            if step == 0:
                probs = yes_no_other(logits, self.yes_ids, self.no_ids)
            nxt = torch.where(done, torch.full_like(done, eos, dtype=torch.long),
                              logits.argmax(-1))
            tokens.append(nxt)
            done |= nxt == eos
            if bool(done.all()):
                break
            embeds = lm.get_input_embeddings()(nxt)[:, None].to(embeds.dtype)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        texts = self.processor.tokenizer.batch_decode(torch.stack(tokens, 1),
                                                      skip_special_tokens=True)
        return [t.strip() for t in texts], probs
