"""Model loading: local folders, fingerprints, and the clear errors."""

import json

import pytest

from mopeq.model.loading import ModelLoadError, fingerprint_dir, fingerprint_model, load_model
from mopeq.model.moe import discover
from tests.helpers import tiny_model


@pytest.fixture
def saved_lm(tmp_path):
    model = tiny_model("qwen2_moe")
    model.save_pretrained(tmp_path / "m")
    return model, tmp_path / "m"


def test_local_folder_loads_and_fingerprints(saved_lm):
    model, path = saved_lm
    loaded = load_model(str(path))
    assert loaded.kind == "causal_lm"
    assert discover(loaded.model).params() == discover(model).params()
    assert loaded.fingerprint == fingerprint_dir(path) == load_model(str(path)).fingerprint


def test_fingerprint_changes_with_weights(saved_lm, tmp_path):
    model, path = saved_lm
    before = fingerprint_dir(path)
    a = fingerprint_model(model)
    model.lm_head.weight.data[0, 0] += 1.0
    model.save_pretrained(tmp_path / "m2")
    assert fingerprint_dir(tmp_path / "m2") != before
    assert fingerprint_model(model) != a


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no such model folder"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path))


def test_offline_hub_id_fails_fast_with_advice(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="Hugging Face Hub.*local folder"):
        load_model("deepseek-ai/deepseek-vl2-tiny")


def test_remote_code_needs_explicit_opt_in(saved_lm):
    _, path = saved_lm
    config = json.loads((path / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_x.X"}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="trust_remote_code"):
        load_model(str(path))


def test_tiny_vlm_round_trips_through_a_folder(tmp_path):
    import torch

    from mopeq.embedded import tiny

    model, processor = tiny.new_model(tiny.TinyRecipe(hidden_size=64, expert_ffn=64))
    tiny.save(model, processor, tmp_path / "vlm")
    loaded = load_model(str(tmp_path / "vlm"))
    assert loaded.kind == "tiny_vlm"
    batch = processor([torch.zeros(64, 64, 3, dtype=torch.uint8).numpy()], ["Is the square red?"])
    for p in model.parameters():  # the folder holds the 16-bit (bf16) weights
        p.data = p.data.to(torch.bfloat16).float()
    torch.testing.assert_close(loaded.model(**batch).logits, model(**batch).logits)


def test_loads_in_two_threads_run_one_after_the_other(monkeypatch, tmp_path):
    """A load may rewrite transformers' process-wide conversion registry: never two at once."""
    import threading
    import time

    from mopeq.model import loading

    inside, overlaps = [], []

    def slow_load(*_args):
        if inside:
            overlaps.append(1)
        inside.append(1)
        time.sleep(0.2)
        inside.pop()

    monkeypatch.setattr(loading, "_load_dir_unguarded", slow_load)
    threads = [threading.Thread(target=loading._load_dir, args=(tmp_path, "x", False, None))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps == []
