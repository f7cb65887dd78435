"""MME evaluation: parsing, scoring, quick subsets, loaders on fixture copies, adapters, CLI."""

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mopeq.embedded import synthetic, tiny
from mopeq.evaluation import evaluate as ev
from mopeq.evaluation import mme_data
from mopeq.evaluation.adapters import HFVLMAdapter, TinyVLMAdapter, adapter_for
from mopeq.evaluation.evaluate import (
    PROMPT_SUFFIX,
    EvalResult,
    answer_kl,
    compare,
    evaluate_samples,
    parse_answer,
    run_evaluation,
    score_mme,
)
from mopeq.evaluation.mme_data import quick_subset
from mopeq.model.loading import LoadedModel

# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("text, label", [
    ("Yes.", "yes"), ("no,", "no"), ("Not sure", "no"), ("yes\n", "yes"), ("NO", "no"),
    ("", "other"), ("yes", "yes"), ("No", "no"), ("  Yes, it is.", "yes"),
    ("I think yes", "other"), ("Maybe", "other"), ("None", "no"), (None, "other"),
])
def test_parse_answer_official_rule(text, label):
    assert parse_answer(text) == label


# --------------------------------------------------------------------------- scoring


def _rec(qid, cat, answer, prediction, probs=None):
    r = {"question_id": qid, "category": cat, "question": f"{qid}-{answer}", "answer": answer,
         "prediction": prediction}
    if probs is not None:
        r["probs"] = probs
    return r


def test_score_mme_hand_made_records():
    records = [
        _rec("a.jpg", "existence", "Yes", "Yes"), _rec("a.jpg", "existence", "No", "no."),
        _rec("b.jpg", "existence", "Yes", "Yes"), _rec("b.jpg", "existence", "No", "Yes"),
        _rec("c.png", "code_reasoning", "Yes", "maybe"),
        _rec("c.png", "code_reasoning", "No", "No"),
        _rec("a.jpg", "count", "Yes", "Not sure"), _rec("a.jpg", "count", "No", "Not sure"),
    ]
    r = score_mme(records)
    assert r.per_category["existence"] == {"acc": 0.75, "acc_plus": 0.5, "score": 125.0,
                                           "n_pairs": 2, "ci95": [50.0, 200.0]}
    assert r.per_category["count"] == {"acc": 0.5, "acc_plus": 0.0, "score": 50.0, "n_pairs": 1,
                                       "ci95": [50.0, 50.0]}  # one image: nothing to resample
    assert r.per_category["code_reasoning"]["score"] == 50.0
    assert list(r.per_category) == ["existence", "count", "code_reasoning"]  # MME order
    assert (r.score, r.perception, r.cognition, r.n_pairs) == (225.0, 175.0, 50.0, 4)


def test_score_mme_totals_absent_group_is_none():
    r = score_mme([_rec("x", "OCR", "Yes", "yes"), _rec("x", "OCR", "No", "no")])
    assert (r.score, r.perception, r.cognition) == (200.0, 200.0, None)


@pytest.mark.parametrize("n", [1, 3])
def test_score_mme_rejects_images_without_two_questions(n):
    records = [_rec("ok", "color", "Yes", "yes"), _rec("ok", "color", "No", "no")]
    records += [_rec("odd.jpg", "color", "Yes", "yes") for _ in range(n)]
    with pytest.raises(ValueError, match="exactly two questions.*odd.jpg"):
        score_mme(records)


def test_score_mme_rejects_non_yes_no_gold():
    with pytest.raises(ValueError, match="Yes or No"):
        score_mme([_rec("x", "OCR", "Maybe", "yes"), _rec("x", "OCR", "No", "no")])


# ----------------------------------------------------------------------- quick subset


@dataclass(frozen=True)
class Item:
    image_id: str
    category: str
    questions: tuple = ()


def _items(sizes: dict[str, int]) -> list[Item]:
    return [Item(f"{c}-{i}", c, (f"{c}-{i}-q1", f"{c}-{i}-q2"))
            for c, n in sizes.items() for i in range(n)]


def _counts(items) -> dict[str, int]:
    out: dict[str, int] = {}
    for it in items:
        out[it.category] = out.get(it.category, 0) + 1
    return out


def test_quick_subset_equal_strata_whole_pairs_and_order():
    items = synthetic.eval_split(n_per_category=10)
    sub = quick_subset(items, 4 * len(synthetic.CATEGORIES), seed=3)
    assert _counts(sub) == {c: 4 for c in synthetic.CATEGORIES}
    assert all(any(s is it for it in items) for s in sub)  # whole items, questions intact
    positions = [next(i for i, it in enumerate(items) if it is s) for s in sub]
    assert positions == sorted(positions)


def test_quick_subset_proportional_largest_remainder():
    # 1 each, then 7 shared by the remaining 59/29/9 images: 4.26, 2.09, 0.65 -> 4, 2, 0+1
    sub = quick_subset(_items({"a": 60, "b": 30, "c": 10}), 10, seed=0)
    assert _counts(sub) == {"a": 5, "b": 3, "c": 2}


@pytest.mark.parametrize("seed", range(5))
def test_quick_subset_sizes_are_exact_and_bounded(seed):
    rng = np.random.default_rng(seed)
    sizes = {f"c{i}": int(rng.integers(1, 40)) for i in range(int(rng.integers(2, 9)))}
    items = _items(sizes)
    for pairs in range(len(sizes), len(items), 7):
        counts = _counts(quick_subset(items, pairs, seed))
        assert sum(counts.values()) == pairs
        assert all(1 <= counts[c] <= sizes[c] for c in sizes)


def test_quick_subset_is_seeded():
    items = _items({"a": 30, "b": 30})
    ids = [it.image_id for it in quick_subset(items, 10, seed=1)]
    assert ids == [it.image_id for it in quick_subset(items, 10, seed=1)]
    assert ids != [it.image_id for it in quick_subset(items, 10, seed=2)]


def test_quick_subset_fewer_pairs_than_categories_and_edges():
    items = _items({c: 5 for c in "abcdef"})
    sub = quick_subset(items, 3, seed=0)
    assert len(sub) == 3 and len(_counts(sub)) == 3
    assert quick_subset(items, 100, seed=0) == items
    with pytest.raises(ValueError, match="positive"):
        quick_subset(items, 0)


# --------------------------------------------------------------------- data fixtures

# image name -> (category, size, colour, ((question, answer), (question, answer)))
FIXTURE = {
    "0001.png": ("existence", (40, 30), (250, 0, 0),
                 (("Is there a red block? Please answer yes or no.", "Yes"),
                  ("Is there a cat? Please answer yes or no.", "No"))),
    "0002.png": ("existence", (20, 20), (0, 250, 0),
                 (("Is it blue? Please answer yes or no.", "No"),
                  ("Is it green? Please answer yes or no.", "Yes"))),
    "10002.png": ("artwork", (32, 48), (0, 0, 250),
                  (("Is this by Monet? Please answer yes or no.", "Yes"),
                   ("Is this by Dali? Please answer yes or no.", "No"))),
    "0020.png": ("code_reasoning", (24, 24), (9, 9, 9),
                 (("Does the code print 3? Please answer yes or no.", "No"),
                  ("Does the code print 2? Please answer yes or no.", "Yes"))),
}


def _png(size, colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def write_release(root: Path) -> Path:
    """A tiny copy of MME in the official release layout."""
    base = root / "MME_Benchmark_release_version"
    (base / "eval_tool" / "Your_Results").mkdir(parents=True)  # present in releases; ignored
    for name, (cat, size, colour, qas) in FIXTURE.items():
        split = cat in mme_data.SPLIT_FOLDER_SUBTASKS
        img_dir = base / cat / ("images" if split else "")
        txt_dir = base / cat / ("questions_answers_YN" if split else "")
        img_dir.mkdir(parents=True, exist_ok=True)
        txt_dir.mkdir(parents=True, exist_ok=True)
        (img_dir / name).write_bytes(_png(size, colour))
        (txt_dir / f"{Path(name).stem}.txt").write_text(
            "".join(f"{q}\t{a}\n" for q, a in qas), encoding="utf-8")
    return base


def write_parquet(folder: Path, shards: int = 2) -> Path:
    """The same data as parquet shards in the lmms-lab/MME layout (one row per question)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"question_id": f"{cat}/{name}", "image": {"bytes": _png(size, colour),
                                                       "path": name},
             "question": q, "answer": a, "category": cat}
            for name, (cat, size, colour, qas) in FIXTURE.items() for q, a in qas]
    (folder / "data").mkdir(parents=True)
    for k in range(shards):
        part = rows[k * len(rows) // shards : (k + 1) * len(rows) // shards]
        pq.write_table(pa.Table.from_pylist(part), folder / "data" / f"test-{k:05d}.parquet")
    return folder


def _expected():
    return sorted(((cat, tuple(qas)) for cat, _, _, qas in FIXTURE.values()),
                  key=lambda x: mme_data.category_order(x[0]))


def _summary(items):
    return [(it.category, tuple((q.text, q.answer) for q in it.questions)) for it in items]


def test_load_release_folder(tmp_path):
    base = write_release(tmp_path)
    for spec in (base, tmp_path):  # the release folder itself, or its parent
        items = ev.load_dataset(str(spec))
        assert sorted(_summary(items)) == sorted(_expected())
        assert [it.category for it in items] == ["existence", "existence", "artwork",
                                                 "code_reasoning"]
    art = next(it for it in items if it.category == "artwork")
    assert art.image_id == "10002.png" and art.image.size == (32, 48)
    assert art.image.getpixel((0, 0)) == (0, 0, 250)


def test_release_folder_errors(tmp_path):
    base = write_release(tmp_path)
    txt = base / "existence" / "0001.txt"
    txt.write_text(txt.read_text() + "Is it round?\tYes\n")
    with pytest.raises(ValueError, match="exactly two questions"):
        ev.load_dataset(str(base))
    txt.write_text("Is it red? Yes\nIs it a cat?\tNo\n")
    with pytest.raises(ValueError, match="question<TAB>answer"):
        ev.load_dataset(str(base))
    txt.write_text("Is it red?\tYes\nIs it a cat?\tYes\n")
    with pytest.raises(ValueError, match="one 'Yes' and one 'No'"):
        ev.load_dataset(str(base))
    txt.write_text("Is it red?\tYes\nIs it a cat?\tNo\n")
    (base / "existence" / "0001.png").unlink()
    with pytest.raises(ValueError, match="no image"):
        ev.load_dataset(str(base))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not an MME copy"):
        ev.load_dataset(str(tmp_path / "empty"))


def test_load_parquet_file_and_shards_match_release(tmp_path):
    release = ev.load_dataset(str(write_release(tmp_path / "r")))
    folder = write_parquet(tmp_path / "p")
    from_folder = ev.load_dataset(str(folder))
    assert _summary(from_folder) == _summary(release)
    assert [it.image_id for it in from_folder][2] == "artwork/10002.png"
    for a, b in zip(from_folder, release, strict=True):
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    one = ev.load_dataset(str(folder / "data" / "test-00000.parquet"))
    assert {it.image_id for it in one} < {it.image_id for it in from_folder}


def test_parquet_image_with_one_question_is_an_error(tmp_path):
    import pyarrow.parquet as pq

    f = write_parquet(tmp_path, shards=1) / "data" / "test-00000.parquet"
    pq.write_table(pq.read_table(f).slice(1), f)  # drop the first question of 0001.png
    with pytest.raises(ValueError, match="exactly two questions"):
        ev.load_dataset(str(f))


def test_hub_id_offline_says_so(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="offline.*local copy"):
        ev.load_dataset("lmms-lab/MME")
    import huggingface_hub

    def unreachable(*args, **kwargs):
        raise ConnectionError("no route to host")

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", unreachable)
    with pytest.raises(ValueError, match="ConnectionError.*offline"):
        ev.load_dataset("lmms-lab/MME")


def test_bad_specs(tmp_path):
    with pytest.raises(ValueError, match="no MME data"):
        ev.load_dataset(str(tmp_path / "missing" / "copy"))
    with pytest.raises(ValueError, match="no MME data"):
        ev.load_dataset("./nope")
    n = synthetic.EVAL_PER_CATEGORY * len(synthetic.CATEGORIES)
    assert len(ev.load_dataset("synthetic")) == n


# ------------------------------------------------------------------ evaluation runs


class CannedAdapter:
    """Answers "Yes" to everything and remembers what it was asked."""

    with_suffix = True
    batch_size = 3

    def __init__(self):
        self.asked: list[str] = []

    def answer(self, images, questions):
        self.asked += list(questions)
        return ["Yes"] * len(questions), np.tile([0.7, 0.2, 0.1], (len(questions), 1))


def test_evaluate_samples_with_canned_answers_and_suffix(tmp_path):
    items = ev.load_dataset(str(write_parquet(tmp_path)))
    adapter = CannedAdapter()
    r = evaluate_samples(adapter, items, batch_size=3, with_suffix=True)
    assert all(v["score"] == 50.0 for v in r.per_category.values())  # acc 0.5, acc+ 0
    assert (r.n_pairs, len(r.records), r.score) == (4, 8, 150.0)
    assert adapter.asked[0] == "Is there a red block?" + PROMPT_SUFFIX
    assert all("Please answer" not in q for q in adapter.asked)
    assert r.records[0]["question"] == "Is there a red block? Please answer yes or no."


@pytest.fixture(scope="module")
def tiny_vlm():
    model, processor = tiny.new_model(tiny.TinyRecipe(hidden_size=64, expert_ffn=64))
    return LoadedModel(model.eval(), processor, "test", "tiny-random", "tiny_vlm")


def test_run_evaluation_tiny_synthetic_subset(tiny_vlm):
    pairs = 2 * len(synthetic.CATEGORIES)
    r = run_evaluation(tiny_vlm, "synthetic", pairs=pairs, seed=4)
    assert r.n_pairs == pairs and len(r.records) == 2 * pairs
    assert {c: v["n_pairs"] for c, v in r.per_category.items()} == {
        c: 2 for c in synthetic.CATEGORIES}
    expected = [s.image_id for s in quick_subset(synthetic.eval_split(), pairs, 4)]
    assert [rec["question_id"] for rec in r.records[::2]] == expected
    probs = np.array([rec["probs"] for rec in r.records])
    assert probs.shape == (2 * pairs, 3) and np.allclose(probs.sum(1), 1, atol=1e-5)
    again = run_evaluation(tiny_vlm, synthetic.eval_split(), pairs=pairs, seed=4, batch_size=7)
    assert [x["prediction"] for x in again.records] == [x["prediction"] for x in r.records]
    assert np.allclose([x["probs"] for x in again.records], probs, atol=1e-5)
    assert json.dumps(r.to_json())  # JSON-ready


def test_tiny_adapter_resizes_real_images(tiny_vlm, tmp_path):
    r = run_evaluation(tiny_vlm, str(write_release(tmp_path)))
    assert r.n_pairs == 4 and set(r.per_category) == {"existence", "artwork", "code_reasoning"}
    assert r.cognition is not None and r.perception is not None


def test_adapter_for_kinds(tiny_vlm, hf_vlm):
    assert isinstance(adapter_for(tiny_vlm), TinyVLMAdapter)
    assert isinstance(adapter_for(LoadedModel(*hf_vlm, "x", "v", "vlm")), HFVLMAdapter)
    from tests.helpers import tiny_lm

    lm = LoadedModel(tiny_lm("olmoe"), None, "x", "some/lm", "causal_lm")
    with pytest.raises(ValueError, match="causal language model"):
        adapter_for(lm)
    with pytest.raises(ValueError, match="causal-LM-only"):
        HFVLMAdapter(lm.model, None)
    with pytest.raises(ValueError, match="cannot prepare images"):
        HFVLMAdapter(hf_vlm[0], hf_vlm[1].tokenizer)


# -------------------------------------------------------------------------- compare


def _result(preds_probs) -> EvalResult:
    recs = []
    for i, (pred, probs) in enumerate(preds_probs):
        recs.append(_rec(f"img{i // 2}", "color", ["Yes", "No"][i % 2], pred, probs))
    return score_mme(recs)


def test_compare_hand_made():
    base = _result([("Yes", [0.9, 0.1, 0.0]), ("No", [0.2, 0.8, 0.0]),
                    ("Yes", [0.6, 0.4, 0.0]), ("No", [0.5, 0.5, 0.0])])
    other = _result([("Yes", [0.9, 0.1, 0.0]), ("No", [0.2, 0.8, 0.0]),
                     ("No", [0.4, 0.6, 0.0]), ("hm", [0.0, 0.0, 1.0])])
    c = compare(base, other)
    kl3 = 0.6 * np.log(0.6 / 0.4) + 0.4 * np.log(0.4 / 0.6)
    kl4 = 0.5 * np.log(0.5 / 1e-8) * 2  # other is certain of "other": floored at KL_EPS
    assert c["kl"] == pytest.approx((kl3 + kl4) / 4, rel=1e-6)
    assert c["kl_max"] == pytest.approx(kl4, rel=1e-6)
    assert c["flip_rate"] == 0.5 and c["n_questions"] == 4
    # baseline: all four right (200); other: image 1 right, image 2 both wrong (acc .5, acc+ .5)
    color = c["per_category"]["color"]
    assert {k: color[k] for k in ("baseline", "other", "delta")} == {
        "baseline": 200.0, "other": 100.0, "delta": -100.0}
    assert color["delta_ci95"][0] <= -100.0 <= color["delta_ci95"][1]
    assert c["score_delta"] == -100.0


def test_compare_self_and_mismatch(tiny_vlm):
    r = run_evaluation(tiny_vlm, "synthetic", pairs=5, seed=0)
    same = compare(r, r)
    assert (same["kl"], same["flip_rate"], same["score_delta"]) == (0.0, 0.0, 0.0)
    assert (same["score_delta_ci95"], same["p_value"]) == ([0.0, 0.0], 1.0)
    with pytest.raises(ValueError, match="different questions"):
        compare(r, run_evaluation(tiny_vlm, "synthetic", pairs=5, seed=1))
    bare = score_mme([{k: v for k, v in x.items() if k != "probs"} for x in r.records])
    with pytest.raises(ValueError, match="probs"):
        compare(bare, bare)


def test_answer_kl_properties():
    p = np.array([[0.7, 0.2, 0.1], [1.0, 0.0, 0.0]])
    assert np.allclose(answer_kl(p, p), 0.0)
    q = np.array([[0.1, 0.2, 0.7], [0.0, 1.0, 0.0]])
    kl = answer_kl(p, q)
    assert np.all(kl > 0) and np.all(np.isfinite(kl))


# ------------------------------------------------------- a real transformers VLM (tiny)

WORDS = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "Yes", "No", "yes", "no", "Is", "is",
         "there", "a", "red", "block", "cat", "it", "blue", "green", "?", "Answer", "the",
         "question", "using", "single", "word", "or", "phrase", ".", "user", "assistant", ":"]
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}"
                 "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }}{% endif %}"
                 "{% endfor %} {% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")


@pytest.fixture(scope="module")
def hf_vlm():
    """A tiny LLaVA (CLIP vision tower, OLMoE MoE language model) and its processor."""
    import transformers as T
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    fast = T.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                     eos_token="</s>", unk_token="<unk>",
                                     extra_special_tokens={"image_token": "<image>"})
    images = T.CLIPImageProcessorPil(size={"shortest_edge": 32},
                                     crop_size={"height": 32, "width": 32})
    processor = T.LlavaProcessor(image_processor=images, tokenizer=fast, patch_size=8,
                                 vision_feature_select_strategy="default",
                                 num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)
    vision = T.CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                num_attention_heads=2, image_size=32, patch_size=8)
    text = T.OlmoeConfig(hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, vocab_size=len(WORDS),
                         num_experts=4, num_experts_per_tok=2, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2, max_position_embeddings=128)
    config = T.LlavaConfig(vision_config=vision, text_config=text, image_token_id=4,
                           vision_feature_layer=-1, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    return T.LlavaForConditionalGeneration(config).eval(), processor


def _images():
    return [Image.new("RGB", (40, 30), (250, 0, 0)), Image.new("RGB", (20, 50), (0, 0, 250))]


def test_hf_adapter_prompt_tokens_and_answers(hf_vlm):
    model, processor = hf_vlm
    adapter = HFVLMAdapter(model, processor)
    assert adapter.yes_ids == [5, 7] and adapter.no_ids == [6, 8]
    question = "Is there a red block?" + PROMPT_SUFFIX
    prompt = adapter.prompt(question)
    assert prompt.startswith("user: <image> Is there") and prompt.endswith("assistant: ")
    texts, probs = adapter.answer(_images()[:1], [question])
    inputs = processor(text=[prompt], images=_images()[:1], return_tensors="pt")
    with torch.no_grad():
        greedy = model.generate(**inputs, do_sample=False, max_new_tokens=16)
        p = model(**inputs).logits[0, -1].softmax(-1)
    new = greedy[0, inputs["input_ids"].shape[1]:]
    assert texts == [processor.tokenizer.decode(new, skip_special_tokens=True).strip()]
    assert probs[0, 0] == pytest.approx(float(p[5] + p[7]), abs=1e-5)
    assert probs[0, 1] == pytest.approx(float(p[6] + p[8]), abs=1e-5)
    assert probs[0].sum() == pytest.approx(1.0, abs=1e-5)


def test_hf_adapter_batches_with_left_padding(hf_vlm):
    adapter = HFVLMAdapter(*hf_vlm)
    short, long = "Is it red?", "Is there a red block or a blue cat in the image?"
    texts, probs = adapter.answer(_images(), [short, long])
    alone_t, alone_p = adapter.answer(_images()[:1], [short])
    assert texts[0] == alone_t[0]
    assert np.allclose(probs[0], alone_p[0], atol=1e-4)


def test_run_evaluation_hf_vlm_on_parquet(hf_vlm, tmp_path):
    loaded = LoadedModel(*hf_vlm, "x", "tiny-llava", "vlm")
    r = run_evaluation(loaded, str(write_parquet(tmp_path)), pairs=3, seed=0)
    assert r.n_pairs == 3 and len(r.per_category) == 3 and len(r.records) == 6
    assert all(len(x["probs"]) == 3 for x in r.records)


# ------------------------------------------------------------------------------- CLI


def test_cli_evaluate_json(tiny_vlm, tmp_path, capsys):
    from mopeq import cli

    tiny.save(tiny_vlm.model, tiny_vlm.processor, tmp_path / "m")
    code = cli.main(["evaluate", "--model", str(tmp_path / "m"), "--dataset", "synthetic",
                     "--pairs", "5", "--seed", "2", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["n_pairs"] == 5 and out["elapsed_s"] > 0
    assert out["score"] == pytest.approx(sum(v["score"] for v in out["per_category"].values()))
    assert set(out["per_category"]["count"]) == {"acc", "acc_plus", "score", "n_pairs", "ci95"}
    assert out["score_ci95"][0] <= out["score"] <= out["score_ci95"][1]
    for v in out["per_category"].values():
        assert v["ci95"][0] <= v["score"] <= v["ci95"][1]
    code = cli.main(["evaluate", "--model", str(tmp_path / "m"), "--dataset", "lmms-lab/MME"])
    assert code == 2 and "offline" in capsys.readouterr().err
