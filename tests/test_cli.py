"""The command line: JSON output and one-line user errors."""

import json
import subprocess
import sys

import pytest

from tests.helpers import tiny_model


def run(*args):
    return subprocess.run([sys.executable, "-m", "mopeq", *args], capture_output=True,
                          text=True, timeout=300, env={"HF_HUB_OFFLINE": "1",
                                                       "PATH": "/usr/bin:/bin"})


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "deepseek"
    model = tiny_model("deepseek_v2")
    model.save_pretrained(path)
    return model, path


def test_inspect_json(saved):
    model, path = saved
    res = run("inspect", "--model", str(path), "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["model_type"] == "deepseek_v2"
    assert info["num_moe_layers"] == 1 and info["num_experts"] == 8 and info["top_k"] == 2
    assert len(info["experts"]) == 8
    assert sum(e["numel"] for e in info["experts"]) == info["params"]["routed_experts"]
    assert info["params"]["total"] == sum(p.numel() for p in model.parameters())
    assert info["experts"][3]["modules"]["down"] == "model.layers.1.mlp.experts.3.down_proj"


def test_inspect_config_only_folder(saved, tmp_path):
    model, _ = saved
    model.config.save_pretrained(tmp_path)
    res = run("inspect", "--model", str(tmp_path), "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["params"]["total"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("args,message", [
    (["inspect", "--model", "/no/such/dir"], "no such model folder"),
    (["inspect", "--model", "org/unreachable-model"], "Hugging Face Hub"),
])
def test_user_errors_are_one_line(args, message):
    res = run(*args)
    assert res.returncode == 2
    assert message in res.stderr
    assert "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_non_moe_model_is_a_user_error(tmp_path):
    import transformers as T

    T.LlamaForCausalLM(T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=2,
                                     vocab_size=64)).save_pretrained(tmp_path)
    res = run("inspect", "--model", str(tmp_path))
    assert res.returncode == 2 and "no MoE layer found" in res.stderr
    assert "Traceback" not in res.stderr


def test_bad_arguments_exit_nonzero():
    res = run("inspect", "--nope")
    assert res.returncode != 0 and "Traceback" not in res.stderr
