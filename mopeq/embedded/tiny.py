"""The embedded default: a tiny MoE vision-language model, and its reproducible training.

Layout (LLaVA style): a small CNN sees a 64x64 image as a 4x4 grid of 16 tokens, an MLP
projector maps them into the width of a transformers MoE language model, and the model answers
with one word. The shipped weights use ``OlmoeForCausalLM`` (MolmoE's language model: 4 layers,
8 routed experts, top-2, every MLP routed). DeepSeek-VL2's layout (``DeepseekV2ForCausalLM``:
a dense first layer and a shared expert beside the routed ones) is available as
``language_model="deepseek_v2"``, but when trained on this data its dense layer, shared
experts and attention did the work: zeroing every routed expert cost under 20 of 1000 points,
so per-expert quantization could not show anything. The prompt is ``question, image tokens,
question again, <answer>``. Everything is built from configs and saved in Hugging Face format
(config.json, model.safetensors, tokenizer.json); no remote code.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
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

from mopeq.embedded import synthetic

MODEL_TYPE = "mopeq_tiny_vlm"
VALIDATION_SEED = 1  # training curves and checkpoint choice use eval_split(seed=1), not seed 0
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>", "<image>", "<answer>", "<describe>")


class TinyVLMConfig(PretrainedConfig):
    """Configuration of the tiny MoE VLM: vision settings plus a nested ``text_config``."""

    model_type = MODEL_TYPE
    sub_configs = {"text_config": AutoConfig}

    def __init__(self, text_config=None, image_size=64, grid=4, vision_width=64,
                 image_token_id=4, num_cell_classes=(4, 6), num_words=9,
                 repeat_question=False, **kwargs):
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
    for word in synthetic.vocabulary() + ["describe"]:
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


# One warmup-stable-decay phase with captions and vision auxiliaries, counting and position
# questions drawn more often (they are learnt last). ``stop_at`` would record, by step count, a
# phase that a time cap ended early, so that even such a run is reproducible.
DEFAULT_PHASES = (
    Phase(steps=5000, lr=2e-3, stream_seed=1,
          weights=(("existence", 1.0), ("count", 1.2), ("position", 1.5), ("color", 0.8),
                   ("OCR", 1.0), ("landmark", 2.2), ("numerical_calculation", 1.6))),
)


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
    hidden_size: int = 128
    num_layers: int = 4
    num_experts: int = 16
    top_k: int = 2
    expert_ffn: int = 128
    initializer_range: float = 0.08
    language_model: str = "olmoe"  # or "deepseek_v2"
    repeat_question: bool = True

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
    return TinyVLMConfig(text_config=text, num_words=len(synthetic.text_classes()) + 1,
                         num_cell_classes=(len(synthetic.SHAPES) + 1, len(synthetic.COLORS) + 1),
                         repeat_question=recipe.repeat_question)


# -------------------------------------------------------------------------- training


def _scene_targets(samples: Sequence[synthetic.Sample], grid: int) -> tuple[torch.Tensor, ...]:
    """Per-cell shape/colour classes and the word class of each sample (0 = none)."""
    shapes = torch.zeros((len(samples), grid * grid), dtype=torch.long)
    colors = torch.zeros_like(shapes)
    words = torch.zeros(len(samples), dtype=torch.long)
    color_names = list(synthetic.COLORS)
    texts = synthetic.text_classes()
    for i, s in enumerate(samples):
        for o in s.scene.objects:
            shapes[i, o.row * grid + o.col] = synthetic.SHAPES.index(o.shape) + 1
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


def training_step(model: TinyMoEVLM, processor, samples, recipe: TinyRecipe) -> dict:
    """Loss of one batch: answers + weighted captions + vision auxiliaries + router balance."""
    batch = _training_batch(samples, processor)
    images = pixel_values([s.image for s in samples])
    feats = model.vision_tower(images)
    vision = model.projector(feats)
    embeds = model.language_model.get_input_embeddings()(batch["input_ids"])
    per_row = vision[batch["image_index"]]
    mask = batch["input_ids"] == model.config.image_token_id
    embeds = embeds.masked_scatter(mask.unsqueeze(-1), per_row.reshape(-1, per_row.shape[-1]))
    out = model.language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                               output_router_logits=True)
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
    return {"loss": loss, "answer": answer_loss.detach(), "caption": caption_loss.detach(),
            "aux": aux.detach(), "balance": balance.detach()}


def new_model(recipe: TinyRecipe) -> tuple[TinyMoEVLM, TinyVLMProcessor]:
    """A freshly initialised model and its processor (seeded by the recipe)."""
    torch.manual_seed(recipe.seed)
    tokenizer = build_tokenizer()
    config = build_config(recipe, vocab_size=len(tokenizer))
    model = TinyMoEVLM(config)
    return model, processor_for(model, tokenizer)


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
    data. ``checkpoint_every`` saves ``out_dir/checkpoints/step-N`` along the way.
    """
    if init_from is not None:
        model, processor = load(init_from)
        prior = Path(init_from, "training_log.json")
        log = json.loads(prior.read_text()) if prior.exists() else {"curve": []}
    else:
        model, processor = new_model(recipe)
        log = {"curve": []}
    log.update(recipe=asdict(recipe), stopped_early=False)
    model.language_model.set_experts_implementation("grouped_mm")
    quick = synthetic.eval_split(eval_pairs, seed=VALIDATION_SEED)
    ctx = {"processor": processor, "quick": quick, "eval_every": eval_every, "log": log,
           "on_progress": on_progress, "minutes": minutes, "out_dir": Path(out_dir),
           "checkpoint_every": checkpoint_every, "report_every": report_every}
    if on_progress:
        on_progress(0, f"training {sum(p.numel() for p in model.parameters()):,} parameters, "
                       f"{sum(p.steps for p in recipe.phases[start_phase:])} steps")
    for index, phase in enumerate(recipe.phases[start_phase:], start=start_phase):
        _run_phase(model, recipe, phase, index, ctx)
        with torch.no_grad():  # what a checkpoint between phases would hold
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16).float())
    save(model.eval(), processor, out_dir)
    Path(out_dir, "training_log.json").write_text(json.dumps(log, indent=1))
    return log


def _run_phase(model: TinyMoEVLM, recipe: TinyRecipe, phase: Phase, index: int, ctx) -> None:
    if phase.repeat_question is not None:
        model.config.repeat_question = ctx["processor"].repeat_question = phase.repeat_question
    weights = dict(phase.weights) if phase.weights else None
    stream = synthetic.train_stream(seed=recipe.seed + phase.stream_seed, weights=weights)
    opt = torch.optim.AdamW(model.parameters(), lr=phase.lr, weight_decay=recipe.weight_decay)
    last = phase.stop_at or phase.steps
    start = time.perf_counter()
    for step in range(last):
        for group in opt.param_groups:
            group["lr"] = phase.lr * _lr_factor(step, phase)
        model.train()
        losses = training_step(model, ctx["processor"],
                               [next(stream) for _ in range(recipe.batch_images)], recipe)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        elapsed = (time.perf_counter() - start) / 60
        capped = ctx["minutes"] is not None and elapsed > ctx["minutes"]
        if (step + 1) % ctx["eval_every"] == 0 or step + 1 == last or capped:
            _log_point(model, ctx, index, step + 1, elapsed, losses)
        elif ctx["on_progress"] and (step + 1) % ctx["report_every"] == 0:
            ctx["on_progress"](step + 1, f"phase {index} step {step + 1}/{last} "
                                         f"{elapsed:.1f} min loss {float(losses['loss']):.3f}")
        every = ctx["checkpoint_every"]
        if every and (step + 1) % every == 0 and step + 1 != last:
            save(model.eval(), ctx["processor"],
                 ctx["out_dir"] / "checkpoints" / f"phase{index}-step{step + 1}")
        if capped:
            ctx["log"]["stopped_early"] = True
            ctx["log"].setdefault("stopped_at", {})[str(index)] = step + 1
            return


def _log_point(model, ctx, phase: int, step: int, minutes: float, losses: dict) -> None:
    from mopeq.evaluation.evaluate import TinyVLMAdapter, evaluate_samples

    result = evaluate_samples(TinyVLMAdapter(model.eval(), ctx["processor"]), ctx["quick"])
    point = {"phase": phase, "step": step, "minutes": round(minutes, 2),
             **{k: round(float(v.detach()), 4) for k, v in losses.items()},
             "score": round(result.score, 1),
             "per_category": {c: round(v["score"], 1) for c, v in result.per_category.items()}}
    ctx["log"]["curve"].append(point)
    if ctx["on_progress"]:
        ctx["on_progress"](step, json.dumps(point))


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
        raise ValueError(f"quantized checkpoint {path} does not match: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    return model
