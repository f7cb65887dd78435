"""DeepSeek-VL2 folders in the hub layout through every stage of the CLI, no remote code.

inspect -> profile (every method) -> allocate -> memory -> quantize -> reload -> evaluate, on the
tiny, small and base structures (tests/dsvl2_helpers.py), plus generation through evaluate.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from mopeq.cli import main
from mopeq.core import methods
from mopeq.model.loading import load_model
from tests.helpers.dsvl2 import write_checkpoint


def cli_json(capsys, *args):
    capsys.readouterr()
    assert main([*args, "--json"]) == 0
    out = capsys.readouterr().out
    return json.loads(out[out.index("{"):])


@pytest.mark.parametrize("structure", ["tiny", "small", "base"])
def test_every_stage_on_a_hub_layout_folder(tmp_path, capsys, structure):
    folder = str(write_checkpoint(structure, tmp_path / "hub"))
    experts = 72 if structure == "base" else 64
    info = cli_json(capsys, "inspect", "--model", folder)
    assert (info["model_type"], info["num_experts"], info["top_k"]) == ("deepseek_vl_v2",
                                                                         experts, 6)
    assert info["params"]["vision"] > 0
    for method in methods.NAMES:  # every sensitivity method
        scores = cli_json(capsys, "profile", "--model", folder, "--method", method,
                          "--probes", "4", "--group-size", "32",
                          "--out", str(tmp_path / f"{method}.json"))
        grid = np.array(scores["scores"], dtype=float)
        assert grid.shape == (1, experts) and np.isfinite(grid).all(), method
        if methods.BY_NAME[method].needs_data:
            assert "vlm:" in scores["meta"]["data"] and scores["meta"]["coverage"] > 0
    assert np.abs(np.array(json.loads((tmp_path / "fisher.json").read_text())["trace_raw"],
                           dtype=float)).max() > 0  # the gradient reached the experts
    bits = tmp_path / "bits.json"
    cli_json(capsys, "allocate", "--model", folder, "--scores", str(tmp_path / "hessian.json"),
             "--group-size", "32", "--out", str(bits))
    mem = cli_json(capsys, "memory", "--model", folder, "--bitmap", str(bits), "--group-size", "32")
    loaded = load_model(folder)
    vision_params = sum(p.numel() for n, p in loaded.model.named_parameters()
                        if not n.startswith("language_model."))
    assert mem["breakdown"]["vision"] == 2 * vision_params  # 16-bit
    out = tmp_path / "q"
    q = cli_json(capsys, "quantize", "--model", folder, "--bitmap", str(bits), "--group-size", "32",
                 "--out", str(out))
    assert q["levels_ok"]
    assert {"processor_config.json", "tokenizer.json", "config.json", "rest.safetensors"} <= {
        p.name for p in out.iterdir()}
    result = cli_json(capsys, "evaluate", "--model", str(out), "--pairs", "2")
    assert result["n_pairs"] == 2
    reloaded = load_model(str(out))
    assert not torch.equal(reloaded.model.language_model.lm_head.weight, torch.zeros(1))
    quantized_vision = {n: p for n, p in reloaded.model.named_parameters()
                        if not n.startswith("language_model.")}
    original = dict(loaded.model.named_parameters())
    for n, p in quantized_vision.items():  # the vision side comes back as it was (bf16)
        torch.testing.assert_close(p, original[n])


def test_generation_through_evaluate(tmp_path):
    from mopeq.evaluation.adapters import adapter_for
    from mopeq.evaluation.evaluate import run_evaluation

    loaded = load_model(str(write_checkpoint("small", tmp_path / "hub")))
    adapter = adapter_for(loaded)
    assert type(adapter).__name__ == "DeepseekVL2Adapter" and not adapter.with_suffix
    result = run_evaluation(loaded, "synthetic", pairs=2, seed=0)
    assert len(result.records) == 4
    assert all(abs(sum(r["probs"]) - 1) < 1e-4 for r in result.records)
    # cached greedy decoding = argmax of full recomputation at every step
    proc = loaded.processor
    im = np.full((80, 140, 3), 200, dtype=np.uint8)
    batch = proc(text=[proc.prompt("Is it red?"), proc.prompt("Is the sky blue? Yes or no.")],
                 images=[im, im[:, :70]])
    tokens, _ = loaded.model.greedy(**batch, max_new_tokens=3)
    ids, mask, seq = batch["input_ids"], batch["attention_mask"], batch["images_seq_mask"]
    for step in range(3):
        with torch.no_grad():
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = loaded.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                                  images=batch["images"], images_seq_mask=seq,
                                  images_spatial_crop=batch["images_spatial_crop"]).logits
        assert torch.equal(logits[:, -1].argmax(-1), tokens[:, step])
        ids = torch.cat([ids, tokens[:, step:step + 1]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        seq = torch.cat([seq, torch.zeros_like(seq[:, :1])], 1)


def test_python_m_mopeq_inspect_without_remote_code(tmp_path):
    folder = write_checkpoint("tiny", tmp_path / "hub")
    res = subprocess.run([sys.executable, "-m", "mopeq", "inspect", "--model", str(folder),
                          "--json"], capture_output=True, text=True, timeout=300,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                              "OMP_NUM_THREADS": "1",
                              "MOPEQ_CACHE_DIR": os.environ["MOPEQ_CACHE_DIR"]})
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["num_moe_layers"] == 1
