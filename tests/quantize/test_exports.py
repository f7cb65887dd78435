"""Exports that are valid and agree: snippets execute, auto-round applies their bits, sizes."""

import re

import numpy as np
import pytest
import torch
import transformers as T

from mopeq.core.memory import MemoryConfig, estimate
from mopeq.embedded import tiny
from mopeq.model.moe import discover
from mopeq.quantize.autoround import QuantConfig, layer_config, quantize
from mopeq.quantize.export import export
from mopeq.quantize.snippets import PER_EXPERT_NOTE, PER_LAYER_NOTE, gptq_snippet
from tests.helpers import CONFIGS, tiny_lm

CFG = QuantConfig(group_size=32)


def _exec(path) -> dict:
    names: dict = {}
    exec(compile(path.read_text(), str(path), "exec"), names)  # noqa: S102 - the test's point
    return names


def _gptq_bits(dynamic: dict, default: int, name: str) -> int:
    """GPTQModel / vLLM semantics: a matching "-:" rule skips, else the first "+:" match."""
    if any(re.match(k[2:], name) for k in dynamic if k.startswith("-:")):
        return 16
    return next((v["bits"] for k, v in dynamic.items()
                 if k.startswith("+:") and re.match(k[2:], name)), default)


@pytest.fixture(scope="module")
def olmoe():
    model = tiny_lm("olmoe")
    return model, discover(model)


def _exported(model, layout, bits, tmp_path, name):
    result = quantize(model, layout, bits, CFG, tokenizer=tiny.build_tokenizer())
    return export(result, layout, tmp_path / name, source="t", fingerprint="0",
                  bitmap_json={"bits": np.asarray(bits).tolist()}), result


def test_every_py_snippet_runs_and_auto_round_applies_its_bits(olmoe, tmp_path):
    from auto_round import AutoRound

    model, layout = olmoe
    bits = np.array([[2, 3, 4, 8, 16, 2, 3, 4], [4, 4, 2, 2, 3, 3, 8, 16]])
    out, result = _exported(model, layout, bits, tmp_path, "mixed")
    snippets = {p.name: _exec(p) for p in out.glob("*.py")}
    assert set(snippets) == {"autoround_layer_config.py", "gptqmodel_dynamic.py"}
    cfg = snippets["autoround_layer_config.py"]["layer_config"]
    assert cfg == {n: {k: c[k] for k in ("bits", "group_size", "sym")}
                   for n, c in result.layer_config.items()}
    fresh = tiny_lm("olmoe")
    ar = AutoRound(fresh, tokenizer=tiny.build_tokenizer(), scheme="W4A16", group_size=32,
                   iters=0, disable_opt_rtn=True, device_map="cpu", enable_torch_compile=False,
                   layer_config=cfg)
    qmodel, _ = ar.quantize()
    applied = {n: int(qmodel.get_submodule(n).bits) for n in cfg}
    assert applied == {n: c["bits"] for n, c in cfg.items()}
    assert applied["model.layers.0.mlp.experts.0.gate_proj"] == 2
    assert applied["model.layers.1.mlp.experts.7.down_proj"] == 16
    g = snippets["gptqmodel_dynamic.py"]
    assert all(_gptq_bits(g["dynamic"], g["bits"], n) == c["bits"] for n, c in cfg.items())
    assert (out / "gptqmodel_dynamic.py").read_text().startswith(PER_EXPERT_NOTE)


def test_a_snapped_map_gets_per_layer_rules_that_match_the_fused_module(olmoe, tmp_path):
    model, layout = olmoe
    bits = np.array([[2] * 8, [3] * 8])
    out, result = _exported(model, layout, bits, tmp_path, "snapped")
    text = (out / "gptqmodel_dynamic.py").read_text()
    assert text.startswith(PER_LAYER_NOTE)
    g = _exec(out / "gptqmodel_dynamic.py")
    for row, block in enumerate(layout.blocks):  # vLLM: one fused experts module per layer
        assert _gptq_bits(g["dynamic"], g["bits"], block.experts_path) == bits[row, 0]
    for n, c in result.layer_config.items():  # GPTQModel: every module
        assert _gptq_bits(g["dynamic"], g["bits"], n) == c["bits"]
    assert (out / "llama_cpp_tensor_types.txt").exists()


def test_per_layer_rules_refuse_a_layer_with_mixed_widths(olmoe):
    _, layout = olmoe
    cfg = layer_config(layout, np.array([[4] * 8, [2] * 8]), CFG)
    cfg["model.layers.1.mlp.experts.3.down_proj"]["bits"] = 16  # e.g. kept for its shape
    assert gptq_snippet(cfg).startswith(PER_EXPERT_NOTE)


def test_estimate_matches_an_exported_deepseek_v2_checkpoint(tmp_path):
    """A bf16 DeepSeek-V2 keeps its router fp32; the estimate follows the stored dtypes."""
    from safetensors import safe_open

    cls, config = CONFIGS["deepseek_v2"]()
    config.n_routed_experts = 64  # a router large enough that its dtype shows in the total
    torch.manual_seed(0)
    cls(config).save_pretrained(tmp_path / "src")
    model = T.AutoModelForCausalLM.from_pretrained(tmp_path / "src", dtype=torch.bfloat16)
    layout = discover(model)
    assert {t.dtype for t in layout.tensors if t.component == "router"} == {"float32"}
    bits = np.full((layout.num_moe_layers, layout.num_experts), 2)
    out, _ = _exported(model, layout, bits, tmp_path, "ds")
    on_disk, dtypes = 0, {}
    for shard in out.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                on_disk += t.numel() * t.element_size()
                dtypes[key] = t.dtype
    assert dtypes["model.layers.1.mlp.gate.weight"] == torch.float32
    assert dtypes["model.embed_tokens.weight"] == torch.bfloat16
    est = estimate(layout, bits, MemoryConfig(group_size=32, base_bits=CFG.base_bits))
    assert abs(est.total_bytes - on_disk) / on_disk < 0.01


def test_one_export_is_one_run_every_file_named_after_it(olmoe, tmp_path):
    import json

    import pandas as pd

    from mopeq.app import state as st
    from mopeq.app import tables
    from mopeq.model.loading import LoadedModel
    from mopeq.sensitivity.profile import ProfileConfig, profile
    from mopeq.workflow.spec import RunSpec
    from mopeq.workflow.workspace import Run, allocate

    model, layout = olmoe
    entry = st.ModelEntry(LoadedModel(model, tiny.build_tokenizer(), "0", "t", "causal_lm"),
                          layout)
    used = profile(model, layout, "frobenius", ProfileConfig(closed_form=True))
    alloc = allocate(used, layout, RunSpec(group_size=32))
    quant = quantize(model, layout, alloc.bitmap, CFG, tokenizer=tiny.build_tokenizer())
    run = Run("#1 kmeans · frobenius 3.00b", alloc, quant, None, None, {}, used)
    live = used.__class__("hessian", used.scores * 0 + 7.0, used.per_projection)
    live_bits = np.full(alloc.bitmap.bits.shape, 4).tolist()  # the page moved on since the run
    files = st.export(entry, live, live_bits, run, tmp_path)
    names = sorted(p.rsplit("/", 1)[-1] for p in files)
    prefix = tables.run_file_prefix(run.label)
    assert prefix == "run1_kmeans_frobenius_3.00b_"
    assert all(n.startswith(prefix) for n in names)
    assert f"{prefix}scores_frobenius.csv" in names and f"{prefix}checkpoint.zip" in names
    frame = pd.read_csv(tmp_path / f"{prefix}scores_frobenius.csv")
    assert frame["bits"].tolist() == alloc.bitmap.bits.ravel().tolist()
    assert np.allclose(frame["score"], used.scores.ravel())
    recipe = json.loads((tmp_path / f"{prefix}recipe.json").read_text())
    assert recipe["allocation"]["bits"] == alloc.bitmap.bits.tolist()


def test_export_files_follow_the_table(tmp_path):
    from mopeq.quantize.export import FILES, write_files

    recipe = {"modules": {"model.layers.0.mlp.experts.0.up_proj": {"bits": 4, "group_size": 32,
                                                                     "sym": True}},
              "deployable_fused": False, "allocation": {"bits": [[4, 2]], "layers": [0]}}
    written = write_files(recipe, tmp_path)
    assert list(written) == [n for n in FILES if n != "llama_cpp_tensor_types.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(written)
    recipe["deployable_fused"] = True
    recipe["allocation"]["bits"] = [[4, 4]]
    assert "llama_cpp_tensor_types.txt" in write_files(recipe, tmp_path)
