"""MoE VLMs without torchvision, calibration that must see images, remote-code errors."""

import json

import pytest

from mopeq.model.loading import ModelLoadError, image_processor_only, load_model
from tests.helpers import molmoe as molmoe_fixture
from tests.helpers import tiny_model

QWEN_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
            "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
            "{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}")


def _vlm_folder(tmp_path, name, with_image_processor):
    import transformers as T

    folder = tmp_path / name
    tiny_model(name).save_pretrained(folder)
    tok = molmoe_fixture.tokenizer()
    tok.add_special_tokens({"additional_special_tokens": QWEN_TOKENS})
    tok.chat_template = TEMPLATE
    tok.save_pretrained(folder)
    if with_image_processor:
        T.Qwen2VLImageProcessor(patch_size=8, merge_size=2, temporal_patch_size=2).save_pretrained(
            folder)
    return folder


@pytest.mark.parametrize("name", ["qwen3_vl_moe", "glm4v_moe"])
def test_processor_is_built_without_its_video_part(tmp_path, name):
    folder = _vlm_folder(tmp_path, name, with_image_processor=True)
    processor = image_processor_only(folder)
    assert processor is not None and processor.image_processor is not None
    assert not hasattr(processor, "video_processor") or processor.video_processor is None
    out = tmp_path / "saved"
    processor.save_pretrained(out)  # what an export writes beside the weights
    (out / "config.json").write_text((folder / "config.json").read_text())
    again = image_processor_only(out)
    assert again is not None and again.image_processor.patch_size == 8
    assert load_model(str(folder)).processor.image_processor is not None


def test_calibration_without_an_image_processor_is_an_error(tmp_path):
    from mopeq.sensitivity.calibration import calibration_batches

    loaded = load_model(str(_vlm_folder(tmp_path, "qwen3_vl_moe", with_image_processor=False)))
    assert loaded.kind == "vlm"
    with pytest.raises(ValueError, match="holds no image.*image processor"):
        calibration_batches(loaded, n_batches=1, batch_size=1)


def test_a_batch_without_images_is_an_error():
    from mopeq.sensitivity import calibration

    class TextOnly:  # a processor that silently drops images, as a tokenizer does
        image_processor = object()

        def apply_chat_template(self, chat, tokenize=False):
            return "text"

        def __call__(self, images=None, text=None, **kw):
            import torch

            ids = torch.ones(len(text), 3, dtype=torch.long)
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    with pytest.raises(ValueError, match="holds no image"):
        calibration._vlm_data(TextOnly(), 1, 1, 0)


def test_remote_code_failure_is_one_clear_line(tmp_path, monkeypatch, capsys):
    from mopeq.cli import main

    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    folder = tmp_path / "remote"
    tiny_model("olmoe").save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_broken.BrokenForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_broken.py").write_text(
        "from transformers import OlmoeForCausalLM\n\n"
        "class BrokenForCausalLM(OlmoeForCausalLM):\n"
        "    def __init__(self, config):\n"
        "        raise AttributeError(\"'X' object has no attribute 'all_tied_weights_keys'\")\n")
    with pytest.raises(ModelLoadError, match=r"the model's own code failed on transformers 5\.\d+"
                                             r": AttributeError: .*all_tied_weights_keys.*pin"):
        load_model(str(folder), trust_remote_code=True)
    capsys.readouterr()
    assert main(["inspect", "--model", str(folder), "--trust-remote-code"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "own code failed" in err[0] and "Traceback" not in err[0]
    with pytest.raises(ModelLoadError, match="trust_remote_code"):  # still an explicit opt-in
        load_model(str(folder))
