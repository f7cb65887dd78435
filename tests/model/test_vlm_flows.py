"""Qwen3-VL-MoE and GLM-4V-MoE folders through every stage of the CLI (issue #13, item 4).

Each folder is what ``save_pretrained`` writes for a real checkpoint: config (token ids that
match the tokenizer), weights, tokenizer with a chat template that places the image, and the
image processor (no video processor: it needs torchvision). inspect -> every sensitivity
method -> allocate -> memory -> quantize -> reload -> evaluate.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mopeq.cli import main
from mopeq.core import methods
from tests.helpers import molmoe as molmoe_fixture

# image tokens and the chat template of each family (as their hub tokenizers spell them)
FAMILIES = {
    "qwen3_vl_moe": dict(start="<|vision_start|>", end="<|vision_end|>", image="<|image_pad|>",
                         video="<|video_pad|>"),
    "glm4v_moe": dict(start="<|begin_of_image|>", end="<|end_of_image|>", image="<|image|>",
                      video="<|video|>"),
}


def _template(tokens: dict) -> str:
    return ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
            f"{{% if c['type'] == 'image' %}}{tokens['start']}{tokens['image']}{tokens['end']}"
            "{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _config(name: str, tok) -> object:
    import transformers as T

    ids = {k: tok.convert_tokens_to_ids(v) for k, v in FAMILIES[name].items()}
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, vocab_size=len(tok), max_position_embeddings=256,
                head_dim=16, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                moe_intermediate_size=32, num_experts_per_tok=2)
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                  patch_size=8, spatial_merge_size=2, temporal_patch_size=2)
    if name == "qwen3_vl_moe":
        return T.Qwen3VLMoeConfig(
            text_config=dict(text, num_experts=8, rope_scaling={"rope_type": "default",
                                                                  "mrope_section": [2, 3, 3]}),
            vision_config=dict(vision, deepstack_visual_indexes=[0]),
            image_token_id=ids["image"], video_token_id=ids["video"],
            vision_start_token_id=ids["start"], vision_end_token_id=ids["end"])
    return T.Glm4vMoeConfig(
        text_config=dict(text, n_routed_experts=8, n_shared_experts=1, first_k_dense_replace=1,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "partial_rotary_factor": 0.5,
                                          "mrope_section": [1, 1, 2]}),  # 16 x 0.5 / 2 = 4
        vision_config=vision, image_token_id=ids["image"], video_token_id=ids["video"],
        image_start_token_id=ids["start"], image_end_token_id=ids["end"])


def write_folder(name: str, out) -> str:
    """A hub-like folder of a tiny random-weight ``name`` model whose files agree."""
    import transformers as T

    tok = molmoe_fixture.tokenizer()
    tok.add_special_tokens({"additional_special_tokens": list(FAMILIES[name].values())})
    tok.chat_template = _template(FAMILIES[name])
    config = _config(name, tok)
    cls = (T.Qwen3VLMoeForConditionalGeneration if name == "qwen3_vl_moe"
           else T.Glm4vMoeForConditionalGeneration)
    torch.manual_seed(0)
    cls(config).eval().save_pretrained(out)
    tok.save_pretrained(out)
    T.Qwen2VLImageProcessor(patch_size=8, merge_size=2, temporal_patch_size=2,
                            min_pixels=32 * 32, max_pixels=64 * 64).save_pretrained(out)
    return str(out)


def _cli_json(capsys, *args) -> dict:
    capsys.readouterr()
    assert main([*args, "--json"]) == 0, args
    out = capsys.readouterr().out
    return json.loads(out[out.index("{"):])


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_stage_through_the_cli(tmp_path, capsys, name):
    folder = write_folder(name, tmp_path / name)
    info = _cli_json(capsys, "inspect", "--model", folder)
    assert (info["model_type"], info["num_experts"]) == (name, 8)
    assert info["params"]["vision"] > 0
    for method in methods.NAMES:
        scores = _cli_json(capsys, "profile", "--model", folder, "--method", method,
                           "--probes", "4", "--group-size", "32",
                           "--out", str(tmp_path / f"{method}.json"))
        grid = np.array(scores["scores"], dtype=float)
        assert grid.shape[1] == 8 and np.isfinite(grid).all(), method
        if methods.BY_NAME[method].needs_data:
            assert "vlm:" in scores["meta"]["data"], method  # calibration saw images
    bits = tmp_path / "bits.json"
    _cli_json(capsys, "allocate", "--model", folder, "--scores", str(tmp_path / "fisher.json"),
              "--group-size", "32", "--out", str(bits))
    mem = _cli_json(capsys, "memory", "--model", folder, "--bitmap", str(bits),
                    "--group-size", "32")
    assert mem["breakdown"]["vision"] > 0
    out = tmp_path / "q"
    q = _cli_json(capsys, "quantize", "--model", folder, "--bitmap", str(bits),
                  "--group-size", "32", "--out", str(out))
    assert q["levels_ok"]
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "tokenizer.json", "preprocessor_config.json",
            "chat_template.jinja"} <= names  # everything the reload below needs
    result = _cli_json(capsys, "evaluate", "--model", str(out), "--pairs", "2")
    assert result["n_pairs"] == 2 and 0 <= result["score"] <= 200 * len(result["per_category"])
    assert result["score_ci95"][0] <= result["score"] <= result["score_ci95"][1]
