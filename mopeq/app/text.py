"""The page's fixed text: title, notes, warnings, examples and the ``gradio_client`` example."""

from __future__ import annotations

TITLE = "mopeq: per-expert quantization of MoE models"
INTRO = ("# mopeq · per-expert mixed-precision quantization of MoE models\n"
         "See which experts are sensitive, pick bits per expert while the memory "
         "follows, quantize, and check accuracy on a quick MME subset "
         "([MoPEQ](https://arxiv.org/abs/2509.02512)).")
SOURCE_INFO = ("'embedded' (the tiny MoE VLM shipped here), a local folder "
               "or a Hugging Face hub id")
TRUST_INFO = "⚠ runs the model repository's Python code"
TRUST_WARNING = ("trust_remote_code is on: loading will run Python code from the model's "
                 "repository on this machine. Only do this for authors you trust.")
LOADING = "Loading the embedded model…"
EXAMPLES = [["embedded"], ["allenai/OLMoE-1B-7B-0924"], ["Qwen/Qwen3-VL-30B-A3B-Instruct"]]
EXAMPLES_LABEL = "Examples (hub models need a network and their RAM)"
SENSITIVITY = "## 1 · Sensitivity"
ALLOCATION = "## 2 · Allocate bits (updates live)"
QUANTIZE = "## 3 · Quantize and evaluate"
EXPORT = "## 4 · Export"
REPORT_TITLE = "Sensitivity quality: which score predicts quantization damage?"
REPORT_INTRO = ("Every method against `measured` (each expert alone RTN-quantized, the "
                "answer KL it causes): Spearman with a 95 % bootstrap interval, "
                "reliability, wall time, and the answer KL of the budget allocation each "
                "method drives. The full report takes many minutes (cached methods come "
                "back at once).")
REPORT_QUICK = ("Under a minute on the embedded model: frobenius (closed form), fisher, "
                "frequency and block_fisher against measured on 8 calibration samples, realised "
                "on the quick MME subset; no held-out reference or split halves (wider "
                "intervals). Off: every method, the full calibration set, the whole held-out "
                "split (many minutes).")
EXPORTED = "Recipe, scores, engine snippets and checkpoint, all of run **{label}**."
SCORES_ONLY = "Scores only: quantize first to export the recipe, snippets and checkpoint."
CANCELLED = "Cancelled."
NO_MODEL = "Load a model first."
NO_STDERR = "{method} has no standard error here (exact or counted); showing scores."
API_EXAMPLE = """```python
from gradio_client import Client

client = Client("http://127.0.0.1:7860/")  # or the Space id, e.g. "user/mopeq"
layout = client.predict(source="embedded", api_name="/load_model")
scores = client.predict(source="embedded", method="frobenius", closed_form=True,
                        api_name="/profile")
alloc = client.predict(source="embedded", method="kmeans", clusters=3, bits=[2, 3, 4],
                       api_name="/allocate")
print(alloc["avg_bits"], alloc["memory"]["total_bytes"], alloc["deployable_fused"])
run = client.predict(source="embedded", clusters=3, bits=[2, 3, 4], mode="rtn", pairs=20,
                     api_name="/quantize_evaluate")
print(run["score"], run["baseline_score"], run["per_category"])
```"""


def method_info(recommended: str) -> str:
    """The sensitivity dropdown's note: the paper's baseline and the recommended method."""
    return (f"frobenius: the paper's data-free baseline; "
            f"{recommended}: the best data-aware ranking")
