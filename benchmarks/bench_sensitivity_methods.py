"""Wall time of every sensitivity method: the embedded model, and a DeepSeek-V3 layout per layer.

1. The embedded model (``assets/tiny-moe-vlm``), the app's calibration set (4 x 16 images):
   median wall time of ``profile`` per method over ``--repeats`` runs (cache off).
2. A DeepSeek-V3-layout language model built from its config with real expert and attention
   dimensions (hidden 7168, expert FFN 2048, top-8, MLA attention) but only ``--layers`` decoder
   layers (the first dense) and ``--experts`` routed experts per MoE layer, random weights:
   median time per MoE layer of each method on ``--tokens`` calibration tokens, and the
   estimated cost of ``measured`` on the full model (58 MoE layers x 256 experts x 3 widths
   passes) from one timed pass of the cut-down model (a lower bound: the full model is deeper).

Usage: python benchmarks/bench_sensitivity_methods.py [--part 1|2|all] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mopeq.core import methods
from mopeq.model import moe
from mopeq.model.loading import LoadedModel, load_model  # noqa: E402
from mopeq.sensitivity import calibration  # noqa: E402
from mopeq.sensitivity.measured import measured_cost  # noqa: E402
from mopeq.sensitivity.profile import ProfileConfig, profile  # noqa: E402

FULL_DSV3 = {"moe_layers": 58, "experts": 256}


def median_time(repeats: int, fn) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def bench_embedded(repeats: int, skip: set[str]) -> dict:
    loaded = load_model("embedded")
    layout = moe.discover(loaded.model)
    data = calibration.calibration_batches(loaded, n_batches=4, batch_size=16, seed=0)
    print(f"[1] embedded model, {data.description} ({data.n_tokens} tokens), "
          f"{layout.num_moe_layers} MoE layers x {layout.num_experts} experts")
    out = {}
    for name in methods.NAMES:
        if name in skip:
            continue
        cfg = ProfileConfig(use_cache=False, max_cost_s=None)
        runs = 1 if name == "measured" else repeats
        med, times = median_time(runs, lambda n=name, c=cfg: profile(loaded.model, layout, n,
                                                                      c, data))
        out[name] = {"median_s": med, "runs_s": times}
        print(f"    {name:14s} median {med:8.3f} s over {runs} run(s)")
    return out


def dsv3_layout(layers: int, experts: int) -> torch.nn.Module:
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    config = DeepseekV3Config(hidden_size=7168, intermediate_size=2048, moe_intermediate_size=2048,
                              num_hidden_layers=layers, first_k_dense_replace=1,
                              n_routed_experts=experts, num_experts_per_tok=8, n_group=1,
                              topk_group=1, n_shared_experts=1, num_attention_heads=128,
                              num_key_value_heads=128, q_lora_rank=1536, kv_lora_rank=512,
                              qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                              vocab_size=1024, max_position_embeddings=256,
                              attn_implementation="eager")
    torch.manual_seed(0)
    return DeepseekV3ForCausalLM(config).eval()


def bench_dsv3(repeats: int, layers: int, experts: int, tokens: int, skip: set[str]) -> dict:
    model = dsv3_layout(layers, experts)
    layout = moe.discover(model)
    rows = max(1, tokens // 64)
    data = calibration.calibration_batches(model, None, n_batches=1, batch_size=rows, seed=0,
                                           seq_len=64)
    loaded = LoadedModel(model, None, "bench-dsv3", "dsv3-layout", "causal_lm")
    n_moe = layout.num_moe_layers
    print(f"[2] DeepSeek-V3 layout: {layers} layers ({n_moe} MoE) x {experts} experts "
          f"materialised, {data.n_tokens} tokens")
    out = {}
    for name in methods.NAMES:
        if name in skip or name == "measured":
            continue
        cfg = ProfileConfig(use_cache=False, probes=8 if name in ("hessian", "frobenius")
                            else None, min_probes=8)
        med, times = median_time(repeats, lambda n=name, c=cfg: profile(loaded, layout, n, c,
                                                                         data))
        out[name] = {"median_s": med, "per_moe_layer_s": med / n_moe, "runs_s": times}
        print(f"    {name:14s} median {med:8.2f} s = {med / n_moe:7.2f} s per MoE layer "
              f"({repeats} runs)")
    cost = measured_cost(model, layout, ProfileConfig(), data)
    full = FULL_DSV3["moe_layers"] * FULL_DSV3["experts"] * 3 * cost.seconds_per_pass
    out["measured_estimate"] = {"seconds_per_pass_cut_down": cost.seconds_per_pass,
                                "full_model_passes": FULL_DSV3["moe_layers"]
                                * FULL_DSV3["experts"] * 3, "full_model_s_lower_bound": full}
    print(f"    measured      not run: {cost.message()} here; the full model needs "
          f"{out['measured_estimate']['full_model_passes']} passes, >= {full / 3600:.1f} h")
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", default="all", choices=["1", "2", "all"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--layers", type=int, default=2, help="DeepSeek-V3 decoder layers built")
    ap.add_argument("--experts", type=int, default=8, help="routed experts materialised")
    ap.add_argument("--tokens", type=int, default=128, help="DeepSeek-V3 calibration tokens")
    ap.add_argument("--skip", default="", help="comma-separated methods to leave out")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    print(f"torch {torch.__version__}, {args.threads} thread(s)")
    result = {}
    if args.part in ("1", "all"):
        result["embedded"] = bench_embedded(args.repeats, skip)
    if args.part in ("2", "all"):
        result["dsv3"] = bench_dsv3(args.repeats, args.layers, args.experts, args.tokens, skip)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
