"""The app's flow on folders laid out like the seed models' hub repos (issue #13, done-when).

A launched app, driven by ``gradio_client`` through its public endpoints, the way a user's
script or the page drives it: load -> profile (a data-aware method, images through the
model's own processor) -> allocate -> quantize + evaluate, on a MolmoE-1B and a DeepSeek-VL2
folder (config + safetensors + tokenizer/processor files, no code, no remote code).
"""

from __future__ import annotations

import pytest

from tests.helpers import molmoe as molmoe_fixture
from tests.helpers.dsvl2 import write_checkpoint


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("seed-folders")
    return {"molmo": str(molmoe_fixture.write(root / "molmoe")),
            "deepseek_vl_v2": str(write_checkpoint("tiny", root / "dsvl2"))}


@pytest.mark.parametrize("kind", ["molmo", "deepseek_vl_v2"])
def test_the_app_flow_on_a_seed_model_folder(client, folders, kind):
    source = folders[kind]
    info = client.predict(source=source, api_name="/load_model")
    assert info["model_type"] == kind and info["params"]["vision"] > 0
    shape = (info["num_moe_layers"], info["num_experts"])
    scores = client.predict(source=source, method="fisher", api_name="/profile")
    assert (len(scores["scores"]), len(scores["scores"][0])) == shape
    assert "vlm:" in scores["meta"]["data"]  # calibration went through images
    settings = dict(source=source, score_method="fisher", clusters=3, bits=[2, 3, 4],
                    group_size=32)
    alloc = client.predict(api_name="/allocate", **settings)
    assert {b for row in alloc["bits"] for b in row} <= {2, 3, 4}
    vision = alloc["memory"]["breakdown"]["vision"]
    assert vision >= 2 * info["params"]["vision"]  # as stored (16 or 32 bits), never quantized
    wider = client.predict(api_name="/allocate", **{**settings, "base_bits": 8})
    assert wider["memory"]["breakdown"]["vision"] == vision
    assert wider["memory"]["total_bytes"] > alloc["memory"]["total_bytes"]
    run = client.predict(api_name="/quantize_evaluate", pairs=2, **settings)
    assert run["pairs"] == 2 and run["n_pairs"] == 2
    assert run["avg_bits"] == pytest.approx(alloc["avg_bits"], abs=1e-3)
    assert run["score_ci95"][0] <= run["score"] <= run["score_ci95"][1]
