"""The defaults of a run, written once: every config, the CLI, the page and the API read them.

Changing one here changes it everywhere (``tests/test_defaults.py`` checks the readers).
"""

from __future__ import annotations

BITS: tuple[int, ...] = (2, 3, 4)  # the widths k-means clusters map to (the paper's set)
CLUSTERS = 3  # k-means clusters (C)
GROUP_SIZE = 128  # weights per scale group along the input dimension (the paper's)
SYM = True  # symmetric quantization
BASE_BITS = 4  # attention, dense MLP, shared experts
UNIFORM_BITS = 4  # width of the ``uniform`` baseline
SCOPE = "model"  # one clustering over all experts ("layer": one per MoE layer)
NO_SNAP = "none"  # snap per layer off (the page's and the API's word for it)
ALLOC_METHOD = "kmeans"
SCORE_METHOD = "frobenius"  # the paper's score
TARGET_BITS = 3.0  # the budget allocator's default target (average expert bits)
QUANT_MODE = "rtn"  # "tuned": SignRound
QUANT_ITERS = 50  # tuned mode: SignRound iterations
SEED = 0
QUICK_PAIRS = 100  # the page's and the API's quick MME subset (image pairs); the CLI: all
DATASET = "synthetic"  # the embedded MME-style evaluation set
CLOSED_FORM = False  # frobenius in the library and the CLI: Hutchinson probes
PAGE_CLOSED_FORM = True  # frobenius on the page and the API: the exact value, at once
MAX_COST_S = 900.0  # ``measured`` refuses when its estimated time exceeds this
CALIB_BATCHES = 4  # calibration batches of the data-aware methods
CALIB_BATCH_SIZE = 16
REPORT_TARGETS: tuple[float, ...] = (2.5, 3.0)  # average bits the sensitivity report realises
RANDOM_SEEDS = 5  # the study's ``random`` rows
STUDY_DIR = "study"  # where the study writes its tables
MODEL_SOURCE = "embedded"  # the tiny MoE VLM shipped in assets/
