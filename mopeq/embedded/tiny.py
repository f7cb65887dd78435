"""The embedded default: a tiny MoE vision-language model, its processor and its recipe.

Layout (LLaVA style): a small CNN sees a 64x64 image as a 4x4 grid of 16 tokens, an MLP
projector maps them into the width of a transformers MoE language model, and the model answers
with one word. The shipped weights use ``OlmoeForCausalLM`` (MolmoE's language model: 4 layers,
16 routed experts each, top-2, every MLP routed), with outlier channels at the experts' inputs
(``embedded.outliers``, applied after training: an exact rescale that makes round-to-nearest
hurt it as it hurts a real LLM). DeepSeek-VL2's layout (``DeepseekV2ForCausalLM``:
a dense first layer and a shared expert beside the routed ones) is available as
``language_model="deepseek_v2"``, but when trained on this data its dense layer, shared
experts and attention did the work: zeroing every routed expert cost under 20 of 1000 points,
so per-expert quantization could not show anything. The prompt is ``question, image tokens,
question again, <answer>``. Everything is built from configs and saved in Hugging Face format
(config.json, model.safetensors, tokenizer.json); no remote code. ``embedded.training`` trains
it from a ``TinyRecipe``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    DeepseekV2Config,
    OlmoeConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from mopeq.core.errors import MopeqError
from mopeq.embedded import scenes

MODEL_TYPE = "mopeq_tiny_vlm"
VALIDATION_SEED = 1  # training curves and checkpoint choice use eval_split(seed=1), not seed 0
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>", "<image>", "<answer>", "<describe>")


class TinyVLMConfig(PretrainedConfig):
    """Configuration of the tiny MoE VLM: vision settings plus a nested ``text_config``."""

    model_type = MODEL_TYPE
    sub_configs = {"text_config": AutoConfig}

    def __init__(self, text_config=None, image_size=64, grid=4, vision_width=64,
                 image_token_id=4, num_cell_classes=(4, 6), num_words=9,
                 repeat_question=False, channel_gains=None, **kwargs):
        if isinstance(text_config, dict):
            text_config = dict(text_config)
            text_config = AutoConfig.for_model(text_config.pop("model_type", "deepseek_v2"),
                                               **text_config)
        self.text_config = text_config if text_config is not None else DeepseekV2Config()
        self.image_size = image_size
        self.grid = grid
        self.vision_width = vision_width
        self.image_token_id = image_token_id
        self.num_cell_classes = list(num_cell_classes)  # (shape incl. none, colour incl. none)
        self.num_words = num_words  # word classes incl. "no word"
        self.repeat_question = repeat_question  # prompt: question, image, question again
        # {"exponents": [[...] per layer], "seed": s} once embedded.outliers has been applied
        self.channel_gains = channel_gains
        super().__init__(**kwargs)

    @property
    def num_image_tokens(self) -> int:
        """Image tokens per image (one per grid cell)."""
        return self.grid * self.grid


class TinyVisionEncoder(nn.Module):
    """A small CNN: 64x64 RGB -> grid x grid feature tokens, with auxiliary scene heads.

    The auxiliary heads (per-cell shape and colour, the written word) are only used in training:
    supervising the vision tower directly is what lets vision and language meet within minutes.
    """

    def __init__(self, config: TinyVLMConfig):
        super().__init__()
        w = config.vision_width
        def block(cin, cout, stride):
            return [nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.GELU()]
        layers = block(3, 32, 2) + block(32, w, 2) + block(w, w, 1) + block(w, 2 * w, 2)
        steps = int(math.log2(config.image_size // config.grid)) - 3
        for _ in range(steps):
            layers += block(2 * w, 2 * w, 2)
        self.convs = nn.Sequential(*layers)
        self.pos = nn.Parameter(torch.zeros(config.num_image_tokens, 2 * w))
        self.aux_shape = nn.Linear(2 * w, config.num_cell_classes[0])
        self.aux_color = nn.Linear(2 * w, config.num_cell_classes[1])
        self.aux_word = nn.Linear(2 * w, config.num_words)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Return features of shape (batch, grid*grid, 2*vision_width)."""
        feats = self.convs(pixel_values)  # (B, C, g, g)
        return feats.flatten(2).transpose(1, 2) + self.pos


class TinyMoEVLM(PreTrainedModel):
    """Vision tower + projector + DeepSeek-V2 MoE language model."""

    config_class = TinyVLMConfig
    base_model_prefix = "tiny_vlm"
    _supports_attention_backend = True

    def __init__(self, config: TinyVLMConfig):
        super().__init__(config)
        self.vision_tower = TinyVisionEncoder(config)
        hidden = config.text_config.hidden_size
        self.projector = nn.Sequential(
            nn.Linear(2 * config.vision_width, hidden), nn.GELU(), nn.Linear(hidden, hidden)
        )
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.post_init()

    def _init_weights(self, module):
        """Keep constructor init: torch defaults for vision, the LM's own ``post_init``."""

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        """Token embeddings with the image-token slots replaced by projected vision features."""
        embeds = self.language_model.get_input_embeddings()(input_ids)
        vision = self.projector(self.vision_tower(pixel_values)).to(embeds.dtype)
        mask = input_ids == self.config.image_token_id
        return embeds.masked_scatter(mask.unsqueeze(-1), vision.reshape(-1, vision.shape[-1]))

    def forward(self, input_ids, pixel_values, attention_mask=None, position_ids=None,
                labels=None, **kwargs):
        """Run the language model on text + image embeddings (a transformers output)."""
        embeds = self.embed(input_ids, pixel_values)
        if position_ids is None and attention_mask is not None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return self.language_model(inputs_embeds=embeds, attention_mask=attention_mask,
                                   position_ids=position_ids, labels=labels, **kwargs)


def register() -> None:
    """Make ``AutoConfig``/``AutoModel`` know the tiny VLM (idempotent, no remote code)."""
    try:
        AutoConfig.register(MODEL_TYPE, TinyVLMConfig)
        AutoModel.register(TinyVLMConfig, TinyMoEVLM)
    except ValueError:
        pass  # already registered


# ------------------------------------------------------------------------- processor


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the synthetic vocabulary, built locally."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in scenes.vocabulary() + ["describe"]:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
        unk_token="<unk>", additional_special_tokens=list(SPECIAL_TOKENS[4:]),
    )


class TinyVLMProcessor:
    """Turns (image, question) pairs into model inputs; left-pads so answers come last."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast, num_image_tokens: int = 16,
                 repeat_question: bool = False):
        self.tokenizer = tokenizer
        self.num_image_tokens = num_image_tokens
        self.repeat_question = repeat_question
        self.image_id = tokenizer.convert_tokens_to_ids("<image>")
        self.answer_id = tokenizer.convert_tokens_to_ids("<answer>")

    def prompt_ids(self, question: str) -> list[int]:
        """``<bos> question <image>*16 [question] <answer>`` as token ids."""
        q = self.tokenizer(question, add_special_tokens=False)["input_ids"]
        again = q if self.repeat_question else []
        return [self.tokenizer.bos_token_id, *q, *[self.image_id] * self.num_image_tokens,
                *again, self.answer_id]

    def __call__(self, images: Sequence[np.ndarray], questions: Sequence[str]) -> dict:
        """Batch inputs: ``input_ids``, ``attention_mask`` (left-padded), ``pixel_values``."""
        rows = [self.prompt_ids(q) for q in questions]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixel_values(images)}

    def save_pretrained(self, path: str | Path) -> None:
        """Save the tokenizer (the processor has no other state)."""
        self.tokenizer.save_pretrained(path)


def processor_for(model: TinyMoEVLM, tokenizer=None) -> TinyVLMProcessor:
    """The processor that builds prompts the way ``model`` was trained to read them."""
    return TinyVLMProcessor(tokenizer or build_tokenizer(), model.config.num_image_tokens,
                            bool(getattr(model.config, "repeat_question", False)))


def pixel_values(images: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 HxWx3 arrays -> float tensor (B, 3, H, W) in [-1, 1]."""
    arr = np.stack([np.asarray(im, dtype=np.uint8) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


# -------------------------------------------------------------------------- building


@dataclass(frozen=True)
class Phase:
    """One training phase: a warmup-stable-decay schedule over a fixed number of steps."""

    steps: int
    lr: float
    warmup: int = 200
    decay_fraction: float = 0.25  # the last quarter decays linearly to 0
    stop_at: int | None = None  # stop after this many steps of the schedule (by count)
    weights: tuple[tuple[str, float], ...] | None = None  # category emphasis (None: cycle)
    stream_seed: int = 1
    repeat_question: bool | None = None  # switch the prompt format from this phase on
    # at the phase's start, add position_code x one-hot(row) and x one-hot(column) to the
    # vision tokens' learned position embedding (rounded to bf16); 0: leave it
    position_code: float = 0.0
    # training-only probes of ``position`` questions during this phase, with their loss
    # weights (embedded.training.position_heads): "relation", "cells", "gather"
    probes: tuple[tuple[str, float], ...] = ()


_WEIGHTS = (("existence", 1.0), ("count", 1.2), ("position", 1.5), ("color", 0.8),
            ("OCR", 1.0), ("landmark", 2.2), ("numerical_calculation", 1.6))

# Phase 0: warmup-stable-decay with captions and vision auxiliaries, counting, position and the
# catalogue drawn more often (they are learnt last). It leaves ``position`` at chance: the
# relation of two named objects. Phase 1 teaches it: the vision tokens get a loud row/column
# code, position images are drawn 5x, and training-only probes give each step of the answer
# its own target (find each object's cell, gather both at the answer, compare); the probes
# are not saved. ``stop_at`` would record, by step count, a phase that a time cap ended
# early, so that even such a run is reproducible.
DEFAULT_PHASES = (
    Phase(steps=5000, lr=2e-3, stream_seed=1, weights=_WEIGHTS),
    Phase(steps=3000, lr=1e-3, warmup=50, decay_fraction=0.5, stream_seed=2,
          weights=tuple((c, 5.0 if c == "position" else w) for c, w in _WEIGHTS),
          position_code=8.0, probes=(("relation", 1.0), ("cells", 1.0), ("gather", 1.0))),
)


# Each layer's experts see a quarter of their input channels at 1/2 (layers 0, 1, 3) or 1/8
# (layer 2) of the others' scale, their weights 2x or 8x larger to match: chosen on the
# validation split so that RTN loses what it loses on a real model (README, "The embedded model").
CHANNEL_EXPONENTS = ((-1, 0, 0, 0), (-1, 0, 0, 0), (-3, 0, 0, 0), (-1, 0, 0, 0))


@dataclass(frozen=True)
class TinyRecipe:
    """Everything that determines the shipped weights (``train-tiny`` reproduces it)."""

    seed: int = 0
    phases: tuple[Phase, ...] = DEFAULT_PHASES
    batch_images: int = 24
    weight_decay: float = 0.01
    caption_weight: float = 0.5
    aux_weight: float = 1.0
    router_aux_weight: float = 0.01
    # which hidden state each ``Phase.probes`` probe reads (0: the embeddings); None: the
    # last layer but one for the relation and the gather, the middle one for the cells
    # (3, 3 and 2 for the shipped 4 layers)
    relation_layer: int | None = None
    object_layer: int | None = None
    gather_layer: int | None = None

    hidden_size: int = 128
    num_layers: int = 4
    num_experts: int = 16
    top_k: int = 2
    expert_ffn: int = 128
    initializer_range: float = 0.08
    language_model: str = "olmoe"  # or "deepseek_v2"
    repeat_question: bool = True
    # after training: outlier channels at the experts' inputs, an exact rescale
    # (embedded.outliers; per-layer exponent sets, cycled; () for none, which "deepseek_v2"
    # needs: its shared experts read the same input, and train() refuses before it trains)
    channel_exponents: tuple[tuple[int, ...], ...] = CHANNEL_EXPONENTS
    channel_seed: int = 0

    def probe_layers(self) -> tuple[int, int, int]:
        """The hidden states the relation, cells and gather probes read."""
        late, middle = max(self.num_layers - 1, 0), self.num_layers // 2
        return (late if self.relation_layer is None else self.relation_layer,
                middle if self.object_layer is None else self.object_layer,
                late if self.gather_layer is None else self.gather_layer)

    def scaled(self, total_steps: int) -> TinyRecipe:
        """The same recipe with every phase shortened in proportion (for quick runs)."""
        total = sum(p.steps for p in self.phases)
        phases = tuple(dataclasses.replace(
            p, steps=max(1, round(total_steps * p.steps / total)), stop_at=None,
            warmup=min(p.warmup, max(1, round(total_steps * p.steps / total) // 10)))
            for p in self.phases)
        return dataclasses.replace(self, phases=phases)


def build_config(recipe: TinyRecipe, vocab_size: int) -> TinyVLMConfig:
    """The model config for a recipe (language model: ``recipe.language_model``)."""
    h = recipe.hidden_size
    common = dict(vocab_size=vocab_size, hidden_size=h, num_hidden_layers=recipe.num_layers,
                  num_attention_heads=4, num_key_value_heads=4, num_experts_per_tok=recipe.top_k,
                  max_position_embeddings=64, initializer_range=recipe.initializer_range,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                  attn_implementation="eager")
    if recipe.language_model == "olmoe":  # MolmoE's language model: every MLP is routed
        text = OlmoeConfig(**common, intermediate_size=recipe.expert_ffn,
                           num_experts=recipe.num_experts)
    else:  # DeepSeek-VL2's: a dense first layer, a shared expert beside the routed ones
        text = DeepseekV2Config(
            **common, intermediate_size=2 * h, moe_intermediate_size=recipe.expert_ffn,
            q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16,
            v_head_dim=h // 4, n_routed_experts=recipe.num_experts, n_shared_experts=1,
            first_k_dense_replace=1)
    return TinyVLMConfig(text_config=text, num_words=len(scenes.text_classes()) + 1,
                         num_cell_classes=(len(scenes.SHAPES) + 1, len(scenes.COLORS) + 1),
                         repeat_question=recipe.repeat_question)


def new_model(recipe: TinyRecipe) -> tuple[TinyMoEVLM, TinyVLMProcessor]:
    """A freshly initialised model and its processor (seeded by the recipe)."""
    torch.manual_seed(recipe.seed)
    tokenizer = build_tokenizer()
    config = build_config(recipe, vocab_size=len(tokenizer))
    model = TinyMoEVLM(config)
    return model, processor_for(model, tokenizer)


def save(model: TinyMoEVLM, processor: TinyVLMProcessor, out_dir: str | Path) -> None:
    """Save weights (bf16, the 16-bit baseline), config and tokenizer in Hugging Face format."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.bfloat16) if v.is_floating_point() else v
             for k, v in model.state_dict().items()}
    model.save_pretrained(out, state_dict=state)
    processor.save_pretrained(out)


def load(path: str | Path,
         dtype: torch.dtype = torch.float32) -> tuple[TinyMoEVLM, TinyVLMProcessor]:
    """Load a saved tiny VLM and its processor from a local folder."""
    from transformers import AutoTokenizer

    register()
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    if config.get("quantized_language_model"):
        model = _load_quantized(path, config["quantized_language_model"], dtype)
    else:
        model = TinyMoEVLM.from_pretrained(path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model.eval(), processor_for(model, tokenizer)


def _load_quantized(path: Path, lm_folder: str, dtype: torch.dtype) -> TinyMoEVLM:
    """A tiny VLM whose language model was exported by auto-round (quantized linears)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    config = TinyVLMConfig.from_pretrained(path)
    with torch.device("meta"):
        model = TinyMoEVLM(config)
    lm = AutoModelForCausalLM.from_pretrained(path / lm_folder, device_map="cpu")
    model.language_model = lm
    rest = {k: v.to(dtype) for k, v in load_file(str(path / "rest.safetensors")).items()}
    missing, unexpected = model.load_state_dict(rest, strict=False, assign=True)
    missing = [k for k in missing if not k.startswith("language_model.")]
    if missing or unexpected:
        raise MopeqError(f"quantized checkpoint {path} does not match: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    return model
