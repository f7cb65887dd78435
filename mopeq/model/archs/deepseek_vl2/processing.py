r"""DeepSeek-VL2's image processing and prompt format, and its MME adapter.

Dynamic tiling (the authors' processor): of the candidate resolutions (multiples of the tile
size), take the one that keeps the most of the image's pixels after an aspect-preserving resize,
ties going to the least padding; the image is padded (not stretched) into it, cut into tiles,
and a global view (the whole image padded into one tile) goes first. Pixels are scaled to [0, 1]
and normalised with mean = std = 0.5; the padding colour is the mean. With more than two images
in one prompt no local tiles are cut (1 x 1).

Prompt format (the authors' ``deepseek`` conversation template, an empty system prompt):
``<|User|>: <image>\\n{question}\\n\\n<|Assistant|>:``, after the BOS token; a reply follows the
colon directly and ends with the EOS token.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from mopeq.model.archs.deepseek_vl2.vision import tokens_per_side

PROCESSOR_FILE = "processor_config.json"
USER, ASSISTANT, IMAGE = "<|User|>", "<|Assistant|>", "<image>"
PAD = "<｜▁pad▁｜>"
EXTRA_TOKENS = ("<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>", USER, ASSISTANT)


def select_best_resolution(size: tuple[int, int], candidates) -> tuple[int, int]:
    """The (width, height) of ``candidates`` that keeps most pixels, then wastes fewest."""
    width, height = size
    best, best_kept, best_waste = None, -1, float("inf")
    for cw, ch in candidates:
        scale = min(cw / width, ch / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        waste = cw * ch - kept
        if kept > best_kept or (kept == best_kept and waste < best_waste):
            best, best_kept, best_waste = (cw, ch), kept, waste
    return best


def image_token_count(tile: int, patch: int, ratio: int, tiles_w: int, tiles_h: int) -> int:
    """Placeholders of one image: global h*(w+1), separator, local th*h*(tw*w+1)."""
    s = tokens_per_side(tile, patch, ratio)
    return s * (s + 1) + 1 + tiles_h * s * (tiles_w * s + 1)


class DeepseekVL2Processor:
    """Tokenizer + tiling for DeepSeek-VL2, read from / written to ``processor_config.json``."""

    chat_template = "deepseek"  # the authors' conversation template (see the module docstring)

    def __init__(self, tokenizer, candidate_resolutions, patch_size: int, downsample_ratio: int,
                 image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), normalize: bool = True,
                 **settings):
        self.tokenizer = tokenizer
        self.candidate_resolutions = [tuple(r) for r in candidate_resolutions]
        self.image_size = self.candidate_resolutions[0][0]
        self.patch_size, self.downsample_ratio = patch_size, downsample_ratio
        self.image_mean, self.image_std, self.normalize = image_mean, image_std, normalize
        self.settings = settings
        _add_special_tokens(tokenizer, settings.get("pad_token", PAD))
        self.image_token = IMAGE
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE)

    @property
    def image_processor(self):
        """The object that prepares images (this processor: it tiles them itself)."""
        return self

    # -------------------------------------------------------------------- files

    @classmethod
    def from_pretrained(cls, path: str | Path) -> DeepseekVL2Processor:
        """Read ``processor_config.json`` and the tokenizer files of a model folder."""
        from transformers import PreTrainedTokenizerFast

        path = Path(path)
        config = json.loads((path / PROCESSOR_FILE).read_text())
        config.pop("processor_class", None)
        # the generic class keeps tokenizer.json's own pipeline (byte-level BPE); the hub's
        # ``LlamaTokenizerFast`` class name would impose transformers 5's Llama pipeline
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
        return cls(tokenizer, **config)

    def save_pretrained(self, path: str | Path) -> None:
        """Write the tokenizer files and ``processor_config.json`` (the hub layout)."""
        path = Path(path)
        self.tokenizer.save_pretrained(path)
        config = {"candidate_resolutions": [list(r) for r in self.candidate_resolutions],
                  "patch_size": self.patch_size, "downsample_ratio": self.downsample_ratio,
                  "image_mean": list(self.image_mean), "image_std": list(self.image_std),
                  "normalize": self.normalize, **self.settings,
                  "processor_class": "DeepseekVLV2Processor"}
        (path / PROCESSOR_FILE).write_text(json.dumps(config, indent=1))

    # -------------------------------------------------------------------- prompts

    def prompt(self, question: str) -> str:
        """One user turn with one image, ready for the assistant's reply."""
        return f"{USER}: {IMAGE}\n{question.strip()}\n\n{ASSISTANT}:"

    def apply_chat_template(self, messages, add_generation_prompt: bool = False,
                            tokenize: bool = False) -> str:
        """The authors' format for chat messages (``{"role", "content": [parts]}``)."""
        if tokenize:
            raise ValueError("tokenize=True is not supported: call the processor on the text")
        text = ""
        for m in messages:
            content = m["content"]
            if not isinstance(content, str):
                content = "".join(f"{IMAGE}\n" if p["type"] == "image" else p["text"]
                                  for p in content)
            if m["role"] == "user":
                text += f"{USER}: {content.strip()}\n\n{ASSISTANT}:"
            elif m["role"] == "assistant":
                text += content.strip() + self.tokenizer.eos_token
            else:
                raise ValueError(f"unsupported role {m['role']!r} (user / assistant)")
        return text

    # -------------------------------------------------------------------- images

    def tiles(self, image, crop: bool = True) -> tuple[list[torch.Tensor], tuple[int, int]]:
        """The global view and the local tiles of one image, and (width, height) in tiles."""
        from PIL import Image, ImageOps

        image = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
        image = image.convert("RGB")
        size = self.image_size
        best = select_best_resolution(image.size, self.candidate_resolutions) if crop else (
            size, size)
        fill = tuple(int(x * 255) for x in self.image_mean)
        views = [self._pixels(ImageOps.pad(image, (size, size), color=fill))]
        local = ImageOps.pad(image, best, color=fill)
        for top in range(0, best[1], size):
            for left in range(0, best[0], size):
                views.append(self._pixels(local.crop((left, top, left + size, top + size))))
        return views, (best[0] // size, best[1] // size)

    def _pixels(self, image) -> torch.Tensor:
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        if self.normalize:
            mean = torch.tensor(self.image_mean).view(3, 1, 1)
            x = (x - mean) / torch.tensor(self.image_std).view(3, 1, 1)
        return x

    # -------------------------------------------------------------------- calling

    def __call__(self, text=None, images=None, padding: bool = True, padding_side: str = "left",
                 return_tensors: str = "pt", **_unused):
        """Tokenise prompts with ``<image>`` placeholders; ``images`` fill them in order.

        Returns a ``BatchFeature`` with ``input_ids``, ``attention_mask`` (left padding),
        ``images`` [B, tiles, 3, S, S], ``images_seq_mask`` and ``images_spatial_crop``.

        Raises:
            ValueError: when the placeholders and the images do not match up.
        """
        texts = [text] if isinstance(text, str) else list(text)
        pool = list(images or [])
        rows = []
        for t in texts:
            n = t.count(IMAGE)
            rows.append(self._row(t, pool[:n]))
            pool = pool[n:]
        if pool:
            raise ValueError(f"{len(pool)} image(s) left over: each needs an {IMAGE} placeholder")
        if padding_side != "left":
            raise ValueError("DeepSeek-VL2 pads on the left")
        return self._batch(rows)

    def _row(self, text: str, images: list) -> dict:
        parts = text.split(IMAGE)
        if len(parts) - 1 != len(images):
            raise ValueError(f"{len(parts) - 1} {IMAGE} placeholder(s) but {len(images)} image(s)")
        ids, is_image = [self.tokenizer.bos_token_id], [False]
        views, crops = [], []
        for k, part in enumerate(parts):
            enc = self.tokenizer.encode(part, add_special_tokens=False)
            ids += enc
            is_image += [False] * len(enc)
            if k < len(images):
                tiles, (tw, th) = self.tiles(images[k], crop=len(images) <= 2)
                n = image_token_count(self.image_size, self.patch_size, self.downsample_ratio,
                                      tw, th)
                ids += [self.image_token_id] * n
                is_image += [True] * n
                views += tiles
                crops.append((tw, th))
        return {"ids": ids, "mask": is_image, "views": views, "crops": crops}

    def _batch(self, rows: list[dict]):
        from transformers import BatchFeature

        width = max(len(r["ids"]) for r in rows)
        n_tiles = max(1, *(len(r["views"]) for r in rows))
        n_images = max(1, *(len(r["crops"]) for r in rows))
        size = self.image_size
        out = {"input_ids": torch.full((len(rows), width), self.tokenizer.pad_token_id),
               "attention_mask": torch.zeros(len(rows), width, dtype=torch.long),
               "images_seq_mask": torch.zeros(len(rows), width, dtype=torch.bool),
               "images": torch.zeros(len(rows), n_tiles, 3, size, size),
               "images_spatial_crop": torch.zeros(len(rows), n_images, 2, dtype=torch.long)}
        for b, r in enumerate(rows):
            n = len(r["ids"])
            out["input_ids"][b, width - n:] = torch.tensor(r["ids"])
            out["attention_mask"][b, width - n:] = 1
            out["images_seq_mask"][b, width - n:] = torch.tensor(r["mask"])
            if r["views"]:
                out["images"][b, :len(r["views"])] = torch.stack(r["views"])
                out["images_spatial_crop"][b, :len(r["crops"])] = torch.tensor(r["crops"])
        return BatchFeature(out)


def _add_special_tokens(tokenizer, pad: str) -> None:
    """What the authors' processor adds when missing: pad, ``<image>``, grounding, chat roles."""
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": pad})
    vocab = tokenizer.get_vocab()
    missing = [t for t in (IMAGE, *EXTRA_TOKENS) if t not in vocab]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})


# ------------------------------------------------------------------------------ MME


class DeepseekVL2Adapter:
    """MME answers of DeepSeek-VL2 the way VLMEvalKit asks it (the authors' own evaluation).

    The question goes in as given (with MME's " Please answer yes or no.", no lmms-eval
    suffix) after the image, in the chat format; greedy decoding, ``max_new_tokens=16``.
    P(yes) / P(no) are the first step's softmax mass on the single-token spellings of
    "Yes"/"yes" (resp. "No"/"no"), with and without a leading space.
    """

    with_suffix = False
    batch_size = 8

    def __init__(self, model, processor, max_new_tokens: int = 16):
        from mopeq.evaluation.adapters import answer_token_ids

        self.model, self.processor = model, processor
        self.max_new_tokens = max_new_tokens
        tok = processor.tokenizer
        self.yes_ids = answer_token_ids(tok, ("Yes", "yes"))
        self.no_ids = answer_token_ids(tok, ("No", "no"))

    @torch.no_grad()
    def answer(self, images, questions):
        """Greedy-decode short answers for a batch of (image, question) pairs."""
        inputs = self.processor(text=[self.processor.prompt(q) for q in questions],
                                images=list(images))
        tokens, logits = self.model.greedy(**inputs, max_new_tokens=self.max_new_tokens,
                                           eos_token_id=self.processor.tokenizer.eos_token_id)
        texts = self.processor.tokenizer.batch_decode(tokens, skip_special_tokens=True)
        p = logits.float().softmax(-1)
        yes, no = p[:, self.yes_ids].sum(-1), p[:, self.no_ids].sum(-1)
        probs = torch.stack([yes, no, (1 - yes - no).clamp(min=0)], -1)
        return [t.strip() for t in texts], probs.cpu().numpy()
