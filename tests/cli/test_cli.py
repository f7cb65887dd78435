"""The command line: JSON output and one-line user errors."""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import tiny_model


def run(*args):
    return subprocess.run([sys.executable, "-m", "mopeq", *args], capture_output=True,
                          text=True, timeout=300,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                               "MOPEQ_CACHE_DIR": os.environ["MOPEQ_CACHE_DIR"]})


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "deepseek"
    model = tiny_model("deepseek_v2")
    model.save_pretrained(path)
    from mopeq.embedded.tiny import build_tokenizer

    build_tokenizer().save_pretrained(path)  # auto-round wants the model's tokenizer
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


def test_profile_allocate_memory_quantize_chain(saved, tmp_path):
    model, path = saved
    scores = tmp_path / "scores.json"
    res = run("profile", "--model", str(path), "--method", "frobenius", "--closed-form",
              "--json", "--out", str(scores))
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["method"] == "frobenius" and len(out["scores"]) == 1 and len(out["scores"][0]) == 8
    assert set(out["per_projection"]) == {"gate", "up", "down"}
    assert isinstance(out["cache_hit"], bool) and "elapsed_s" in out
    bitmap = tmp_path / "bits.json"
    res = run("allocate", "--model", str(path), "--scores", str(scores), "--clusters", "2",
              "--bits", "2,4", "--group-size", "32", "--json", "--out", str(bitmap))
    assert res.returncode == 0, res.stderr
    alloc = json.loads(res.stdout)
    assert {b for row in alloc["bits"] for b in row} == {2, 4}
    assert alloc["deployable_fused"] is False and 2 < alloc["avg_bits"] < 4
    res = run("memory", "--model", str(path), "--bitmap", str(bitmap), "--group-size", "32",
              "--json")
    assert res.returncode == 0, res.stderr
    mem = json.loads(res.stdout)
    assert mem["total_bytes"] < mem["bf16_bytes"] and mem["ratio"] > 1
    assert mem["breakdown"]["routed_experts"] > 0
    res = run("quantize", "--model", str(path), "--bitmap", str(bitmap), "--group-size", "32",
              "--out", str(tmp_path / "q"), "--json")
    assert res.returncode == 0, res.stderr
    q = json.loads(res.stdout)
    assert q["levels_ok"] is True
    assert (tmp_path / "q" / "recipe.json").exists()
    assert (tmp_path / "q" / "model.safetensors").exists()


def test_bad_bitmap_file_is_a_user_error(saved, tmp_path):
    _, path = saved
    bad = tmp_path / "bits.json"
    bad.write_text(json.dumps({"bits": [[4] * 8, [4] * 8]}))
    res = run("quantize", "--model", str(path), "--bitmap", str(bad), "--group-size", "32",
              "--out", str(tmp_path / "q"))
    assert res.returncode == 2 and "another model" in res.stderr
    assert not (tmp_path / "q").exists()
    res = run("allocate", "--model", str(path), "--scores", str(tmp_path / "none.json"))
    assert res.returncode == 2 and "no such file" in res.stderr


def test_only_user_errors_are_one_line(monkeypatch, capsys):
    from mopeq import cli
    from mopeq.cli import commands
    from mopeq.core.errors import MopeqError

    def fails(exc):
        def cmd(_args):
            raise exc
        return cmd

    monkeypatch.setitem(cli.COMMANDS, "inspect", (*cli.COMMANDS["inspect"][:2],
                                                  fails(MopeqError("bad bits"))))
    assert cli.main(["inspect"]) == 2
    assert capsys.readouterr().err.strip() == "mopeq inspect: error: bad bits"
    monkeypatch.setitem(cli.COMMANDS, "inspect", (*cli.COMMANDS["inspect"][:2],
                                                  fails(KeyError("gate"))))
    with pytest.raises(KeyError):  # a bug keeps its traceback
        cli.main(["inspect"])
    assert commands.cmd_inspect is not None


def test_bad_settings_are_user_errors_before_any_model_loads(capsys):
    from mopeq import cli

    code = cli.main(["allocate", "--scores", "/no/such/scores.json"])
    assert code == 2 and "no such file" in capsys.readouterr().err
    code = cli.main(["profile", "--model", "/no/such/dir", "--probes", "-1"])
    assert code == 2 and "probes must be" in capsys.readouterr().err


def test_quick_sensitivity_report(tmp_path):
    """``sensitivity-report --quick`` runs the quick methods and says so in its files."""
    from mopeq.sensitivity.report import QUICK

    path = tmp_path / "olmoe"
    tiny_model("olmoe").save_pretrained(path)  # no tokenizer: calibration on UTF-8 bytes
    res = run("sensitivity-report", "--model", str(path), "--quick", "--group-size", "32",
              "--out", str(tmp_path / "report"))
    assert res.returncode == 0, res.stderr
    data = json.loads((tmp_path / "report" / "sensitivity_report.json").read_text())
    assert [r["method"] for r in data["rows"]] == ["measured", *QUICK.methods]
    assert data["meta"]["config"]["n_batches"] == QUICK.n_batches
    assert data["meta"]["config"]["heldout_reference"] is False
    assert all(r["spearman_heldout"] is None for r in data["rows"])
    assert res.stdout.startswith("| method | spearman |")


def test_a_tokenizer_that_does_not_fit_the_model_is_named(saved, tmp_path):
    """The fixture's tokenizer has more ids than its model's embedding: one clear line."""
    _, path = saved
    res = run("profile", "--model", str(path), "--method", "frequency", "--out",
              str(tmp_path / "s.csv"))
    assert res.returncode == 2, res.stderr
    assert "does not belong to this model" in res.stderr and "Traceback" not in res.stderr
