"""Native DeepSeek-VL2: hub key layout, loading, equivalence with plain transformers, tiling."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mopeq.model.archs.deepseek_vl2 import load
from mopeq.model.archs.deepseek_vl2.loading import hub_to_model, model_to_hub
from mopeq.model.archs.deepseek_vl2.processing import image_token_count, select_best_resolution
from mopeq.model.archs.deepseek_vl2.vision import Projector
from mopeq.model.loading import load_model
from mopeq.model.moe import discover
from tests.helpers.dsvl2 import hub_config, new_model, write_checkpoint

STRUCTURES = ("tiny", "small", "base")
# Names and shapes the authors' code gives these cut-down configs (modeling_deepseek_vl_v2.py,
# siglip_vit.py on timm, modeling_deepseek.py): hidden 64, 4 heads, expert FFN 32, ViT width 32.
COMMON_KEYS = {
    "vision.patch_embed.proj.weight": (32, 3, 14, 14), "vision.pos_embed": (1, 25, 32),
    "vision.blocks.1.attn.qkv.weight": (96, 32), "vision.blocks.1.attn.qkv.bias": (96,),
    "vision.blocks.1.mlp.fc1.weight": (119, 32), "vision.norm.weight": (32,),
    "vision.attn_pool.latent": (1, 1, 32), "vision.attn_pool.kv.weight": (64, 32),
    "projector.layers.0.weight": (64, 128), "projector.layers.2.weight": (64, 64),
    "image_newline": (64,), "view_seperator": (64,),
    "language.model.embed_tokens.weight": (512, 64), "language.lm_head.weight": (512, 64),
    "language.model.layers.0.mlp.gate_proj.weight": (128, 64),
    "language.model.layers.1.mlp.gate.weight": (None, 64),
    "language.model.layers.1.mlp.shared_experts.up_proj.weight": (64, 64),
    "language.model.layers.1.mlp.experts.63.down_proj.weight": (64, 32),
}
ATTENTION_KEYS = {
    "tiny": {"q_proj": (64, 64), "k_proj": (64, 64), "v_proj": (64, 64), "o_proj": (64, 64)},
    "small": {"q_proj": (96, 64), "kv_a_proj_with_mqa": (40, 64), "kv_a_layernorm": (32,),
              "kv_b_proj": (128, 32), "o_proj": (64, 64)},
    "base": {"q_a_proj": (48, 64), "q_a_layernorm": (48,), "q_b_proj": (96, 48),
             "kv_a_proj_with_mqa": (40, 64), "kv_b_proj": (128, 32), "o_proj": (64, 64)},
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("dsvl2")
    return {s: write_checkpoint(s, root / s) for s in STRUCTURES}


def _shapes(folder):
    with safe_open(str(folder / "model.safetensors"), framework="pt") as fh:
        return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}  # noqa: SIM118


@pytest.mark.parametrize("structure", STRUCTURES)
def test_checkpoint_has_the_authors_key_layout(folders, structure):
    shapes = _shapes(folders[structure])
    experts = 72 if structure == "base" else 64
    for name, shape in COMMON_KEYS.items():
        want = tuple(experts if d is None else d for d in shape)
        assert shapes[name] == want, name
    for proj, shape in ATTENTION_KEYS[structure].items():
        suffix = "weight"
        assert shapes[f"language.model.layers.1.self_attn.{proj}.{suffix}"] == shape, proj
    bias = "language.model.layers.1.mlp.gate.e_score_correction_bias"
    assert (bias in shapes) == (structure == "base")
    assert f"language.model.layers.1.mlp.experts.{experts - 1}.gate_proj.weight" in shapes
    assert not any(".experts.gate_up_proj" in k or k.startswith("language_model") for k in shapes)
    assert {k.split(".")[0] for k in shapes} == {"vision", "projector", "image_newline",
                                                 "view_seperator", "language"}


def test_weight_names_round_trip():
    model, _ = new_model("base")
    state = model.state_dict()
    back = hub_to_model(model_to_hub(state).items(), torch.float32)
    assert back.keys() == state.keys()
    for k, v in state.items():
        torch.testing.assert_close(back[k], v, rtol=0, atol=0)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_load_matches_the_model_that_was_saved(folders, structure):
    model, processor = new_model(structure)
    for p in model.parameters():  # the folder holds bf16 weights
        p.data = p.data.to(torch.bfloat16).float()
    loaded, _ = load(folders[structure])
    rot = loaded.language_model.model.rotary_emb
    head = rot.config.head_dim
    theta = rot.config.rope_parameters["rope_theta"]
    torch.testing.assert_close(rot.inv_freq, 1 / theta ** (torch.arange(0, head, 2) / head))
    im = np.random.default_rng(0).integers(0, 255, (90, 150, 3), dtype=np.uint8)
    batch = processor(text=[processor.prompt("Is it red?")], images=[im])
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits)


def test_loading_is_strict(folders, tmp_path):
    src = folders["small"]
    for f in ("config.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / f).write_bytes((src / f).read_bytes())
    with safe_open(str(src / "model.safetensors"), framework="pt") as fh:
        state = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    save_file({**state, "language.model.extra.weight": torch.zeros(2)},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="without a place.*extra"):
        load(tmp_path)
    state.pop("language.model.norm.weight")
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="missing.*norm"):
        load(tmp_path)


def test_load_model_picks_native_even_with_auto_map(folders, tmp_path):
    src = folders["tiny"]
    for f in src.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_deepseek_vl_v2.X"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = load_model(str(tmp_path))
    assert loaded.kind == "vlm" and type(loaded.model).__name__ == "DeepseekVL2ForCausalLM"


@pytest.mark.parametrize("structure,cls", [("small", "DeepseekV2ForCausalLM"),
                                           ("base", "DeepseekV3ForCausalLM")])
def test_text_logits_equal_plain_transformers(folders, tmp_path, structure, cls):
    """No image: the logits are those of transformers' own class loading the LM weights."""
    import transformers

    with safe_open(str(folders[structure] / "model.safetensors"), framework="pt") as fh:
        lm = {k.removeprefix("language."): fh.get_tensor(k) for k in fh.keys()  # noqa: SIM118
              if k.startswith("language.")}
    save_file(lm, str(tmp_path / "model.safetensors"))
    c = hub_config(structure)["language_config"]
    c.update(model_type="deepseek_v3" if structure == "base" else "deepseek_v2",
             norm_topk_prob=c.get("norm_topk_prob", False),
             routed_scaling_factor=c.get("routed_scaling_factor", 1.0))
    (tmp_path / "config.json").write_text(json.dumps(c))
    ref = getattr(transformers, cls).from_pretrained(tmp_path, dtype=torch.float32).eval()
    mine, _ = load(folders[structure])
    ids = torch.randint(2, 300, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(mine(input_ids=ids).logits, ref(input_ids=ids).logits)


def test_tiling_choices_on_known_sizes():
    cands = [(m * 384, n * 384) for m in range(1, 10) for n in range(1, 10) if m * n <= 9]
    assert select_best_resolution((384, 384), cands) == (384, 384)
    assert select_best_resolution((768, 384), cands) == (768, 384)
    assert select_best_resolution((100, 50), cands) == (384, 384)  # all keep it: least padding
    assert select_best_resolution((1000, 200), cands) == (1152, 384)  # 3 x 1 tiles
    assert select_best_resolution((300, 1200), cands) == (384, 1536)  # 1 x 4 tiles
    # 384-px tiles, patch 14, 2x2 downsampling: 14 x 14 tokens per tile plus newlines
    assert image_token_count(384, 14, 2, 1, 1) == 14 * 15 + 1 + 14 * 15
    assert image_token_count(384, 14, 2, 2, 1) == 14 * 15 + 1 + 14 * 29


def test_processor_tiles_and_placeholders():
    _, processor = new_model("tiny")
    im = np.zeros((60, 200, 3), dtype=np.uint8)  # wide: 70-px tiles, best 3 x 1
    batch = processor(text=[processor.prompt("Is it red?")], images=[im])
    assert batch["images_spatial_crop"][0, 0].tolist() == [3, 1]
    assert batch["images"].shape == (1, 4, 3, 70, 70)
    assert int(batch["images_seq_mask"].sum()) == image_token_count(70, 14, 2, 3, 1)
    ids = batch["input_ids"][0][~batch["images_seq_mask"][0]].tolist()
    text = processor.tokenizer.decode(ids)
    assert text == "<｜begin▁of▁sentence｜><|User|>: \nIs it red?\n\n<|Assistant|>:"


def test_projector_concatenates_2x2_neighbourhoods_in_unfold_order():
    proj = Projector({"downsample_ratio": 2, "n_embed": 4, "mlp_ratio": 1, "input_dim": 2,
                      "depth": 2})
    seen = {}
    proj.layers[0].register_forward_hook(lambda m, i, o: seen.update(x=i[0]))
    x = torch.arange(9 * 2, dtype=torch.float32).view(1, 9, 2)  # 3 x 3 grid, 2 channels
    proj(x)
    grid = torch.nn.functional.pad(x.view(3, 3, 2), (0, 0, 0, 1, 0, 1))  # padded to 4 x 4
    want = torch.stack([grid[0:2, 0:2, c].reshape(-1) for c in range(2)]).reshape(-1)
    assert seen["x"].shape == (1, 4, 8)
    torch.testing.assert_close(seen["x"][0, 0], want)
    torch.testing.assert_close(seen["x"][0, 3, ::4], grid[2, 2])  # bottom-right: one real patch


def test_layout_counts_vision_and_keeps_it_16bit(folders):
    from mopeq.quantize.autoround import QuantConfig, layer_config

    model, _ = load(folders["base"])
    layout = discover(model)
    assert (layout.num_moe_layers, layout.num_experts, layout.top_k,
            layout.num_shared_experts) == (1, 72, 6, 2)
    vision = sum(p.numel() for n, p in model.named_parameters()
                 if not n.startswith("language_model."))
    assert layout.params()["vision"] == vision
    assert layout.params()["total"] == sum(p.numel() for p in model.parameters())
    cfg = layer_config(layout, np.full((1, 72), 2), QuantConfig(group_size=32),
                       "language_model.")
    assert cfg and not any(k.startswith(("vision", "projector")) for k in cfg)


def test_gradient_reaches_the_experts(folders):
    from mopeq.sensitivity.calibration import batch_loss, calibration_batches, expert_grad_mode

    loaded = load_model(str(folders["small"]))
    data = calibration_batches(loaded, n_batches=1, batch_size=2)
    assert int(data.batches[0]["images_spatial_crop"].sum()) > 0  # the batch holds images
    experts = loaded.model.language_model.model.layers[1].mlp.experts
    params = [experts.gate_up_proj, experts.down_proj]
    with expert_grad_mode(loaded.model, params):
        loss = batch_loss(loaded.model, data.batches[0])
        grads = torch.autograd.grad(loss, params)
    assert all(float(g.abs().sum()) > 0 for g in grads)
