"""The app's text and public API, kept apart from the page wiring in ``app.py``.

``Api`` holds the stateless endpoints keyed by the model source (what ``gradio_client`` calls:
``/load_model``, ``/profile``, ``/allocate``, ``/quantize_evaluate``); the text helpers turn
library objects into the short Markdown the page shows. No gradio, no torch at import.
"""

from mopeq.app import state as st
from mopeq.app import tables, view
from mopeq.core import defaults as D
from mopeq.core import methods

# ------------------------------------------------------------------------ text helpers


def _size(n_bytes: int, unit: str | None = None) -> str:
    """Bytes in the view's one ``unit`` (default: by its own magnitude)."""
    return view.size_text(n_bytes, unit or view.unit_for(n_bytes))


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return str(n)


def layout_text(info: dict) -> str:
    """One paragraph on the model's MoE structure."""
    layers = ", ".join(str(i) for i in info["moe_layers"])
    shared = info["num_shared_experts"]
    return (f"**{info['source']}** · `{info['model_type']}` ({info['kind']}) · "
            f"**{info['num_moe_layers']} MoE layers** (decoder layers {layers}) × "
            f"**{info['num_experts']} routed experts**, top-{info['top_k']} · "
            f"{shared} shared expert{'s' if shared != 1 else ''} · "
            f"{'fused' if info['fused'] else 'per-module'} experts · "
            f"{_count(info['params']['total'])} parameters: " + ", ".join(
                f"{k.replace('_', ' ')} {_count(v)}" for k, v in info["params"].items()
                if v and k != "total"))


def memory_text(alloc) -> str:
    """GB, ratio vs bf16 and bits per weight of an allocation."""
    mem, bm = alloc.memory, alloc.bitmap
    kept = (f" · {mem.kept_16bit} linear(s) kept 16-bit (shape)" if mem.kept_16bit else "")
    unit = view.unit_for(mem.bf16_bytes)
    return (f"### {_size(mem.total_bytes, unit)} · {mem.ratio:.2f}× smaller than bf16\n"
            f"{bm.avg_bits:.2f} bits per expert weight ({mem.avg_bits_experts:.2f} with scales) · "
            f"{mem.avg_bits_all:.2f} bits per weight overall · bf16: {_size(mem.bf16_bytes, unit)}"
            f"{kept}")


def deploy_badge(bitmap) -> str:
    """Whether fused-MoE engines can load the map."""
    if bitmap.deployable_fused:
        return ("✓ **Deployable in fused-MoE engines** (vLLM, SGLang, llama.cpp): one width "
                "per MoE layer.")
    return ("⚠ **Per-expert widths**: loads with transformers / auto-round; for vLLM or "
            "llama.cpp choose *snap per layer*.")


def profile_text(score, cached: bool) -> str:
    """What was computed, how, and whether it came from the cache."""
    meta = score.meta
    how = meta.get("settings", {})
    detail = ("exact closed form" if how.get("closed_form") else
              f"{meta['probes']} probes" if meta.get("probes") else
              f"{how['probes']} probes" if "probes" in how else
              (methods.BY_NAME[score.method].label if score.method in methods.BY_NAME else ""))
    badge = ("⚡ **from cache** — served at once" if cached else
             f"computed in {meta['elapsed_s']:.2f} s")
    cover = (f" · token coverage {meta['coverage']:.0%}" if meta.get("coverage") is not None
             else "")
    return f"**{score.method}** ({detail or 'routing counts'}) · {badge}{cover}"


def _pm(interval) -> str:
    """Half the 95 % interval as " ± x", or nothing when there is no interval."""
    return "" if not interval else f" ± {(interval[1] - interval[0]) / 2:.1f}"


def significance_text(summary: dict) -> str:
    """Plain words on whether the score difference is more than noise at this subset size."""
    ci, p, n = summary.get("score_delta_ci95"), summary.get("p_value"), summary["pairs"]
    if ci is None or p is None:
        return ""
    span = f"95 % CI [{ci[0]:+.1f}, {ci[1]:+.1f}], McNemar p = {p:.2g}"
    if (ci[0] <= 0 <= ci[1]) or p >= 0.05:
        return f"difference **within noise at {n} pairs** ({span})"
    return f"difference **significant at {n} pairs** ({span})"


def run_text(summary: dict) -> str:
    """One line on a quantize-and-evaluate run, with its uncertainty."""
    sig = significance_text(summary)
    kl_ci = summary.get("kl_ci95")
    kl_span = f" [{kl_ci[0]:.4f}, {kl_ci[1]:.4f}]" if kl_ci else ""
    return (f"**{summary['label']}** ({summary['mode']}): MME score **{summary['score']:.1f}"
            f"{_pm(summary.get('score_ci95'))}** vs {summary['baseline_score']:.1f}"
            f"{_pm(summary.get('baseline_score_ci95'))} baseline (Δ {summary['delta']:+.1f}) "
            f"on {summary['pairs']} image pairs{' · ' + sig if sig else ''} · "
            f"KL {summary['kl']:.4f}{kl_span} · "
            f"{summary['flip_rate']:.0%} answers flipped · {_run_size(summary)} · "
            f"quantized in {summary['quantize_s']:.1f} s")


def _run_size(summary: dict) -> str:
    """A run's size in the unit of its model's views (by the bf16 size)."""
    n_bytes = summary["gb"] * 1e9
    return _size(int(n_bytes), view.unit_for(n_bytes * summary.get("ratio_vs_bf16", 1.0)))


# ------------------------------------------------------------------------ public API


class Api:
    """Stateless endpoints keyed by the model source (what ``gradio_client`` calls)."""

    def __init__(self, models: st.ModelCache):
        self.models = models

    def load_model(self, source: str = st.EMBEDDED, trust_remote_code: bool = False) -> dict:
        """Load a model and describe its MoE layout.

        Args:
            source: "embedded", a local Hugging Face folder, or a hub id.
            trust_remote_code: let the model's own code run (only for authors you trust).
        """
        return st.layout_summary(self.models.get(source, trust_remote_code))

    def profile(self, source: str = st.EMBEDDED, method: str = D.SCORE_METHOD, probes: int = 0,
                closed_form: bool = D.PAGE_CLOSED_FORM, trust_remote_code: bool = False) -> dict:
        """Per-expert sensitivity scores (served from the cache when known: cache_hit).

        Args:
            source: the model source, as for load_model.
            method: a sensitivity method (the `mopeq.core.methods` table).
            probes: Hutchinson probes (0: the method's default, frobenius 100, hessian 64).
            closed_form: frobenius only: the exact value instead of probes.
            trust_remote_code: as for load_model.
        """
        entry = self.models.get(source, trust_remote_code)
        score, cached = st.profile(entry, st.ScoreSpec(method, probes, closed_form))
        return {**score.to_json(), "cache_hit": cached, "layers": entry.layout.moe_layers}

    def allocate(self, source: str = st.EMBEDDED, score_method: str = D.SCORE_METHOD,
                 method: str = D.ALLOC_METHOD, clusters: int = D.CLUSTERS,
                 bits: list[int] | None = None, scope: str = D.SCOPE, log_scores: bool = False,
                 target_bits: float = D.TARGET_BITS, uniform_bits: int = D.UNIFORM_BITS,
                 group_size: int = D.GROUP_SIZE, base_bits: int = D.BASE_BITS,
                 snap: str = D.NO_SNAP, probes: int = 0, closed_form: bool = D.PAGE_CLOSED_FORM,
                 trust_remote_code: bool = False, target_gb: float | None = None,
                 seed: int = D.SEED) -> dict:
        """Bits per expert and the memory estimate (bits, avg_bits, deployable_fused, memory).

        Also ``judge_method`` (the sensitivities the predicted loss weighs errors by; never
        routing counts) and ``warnings`` (e.g. a budget target the bit set cannot reach).

        Args:
            source: the model source, as for load_model.
            score_method: the scores to allocate by (frequency allocation uses routing counts).
            method: kmeans | budget | uniform | frequency | random.
            clusters: C, the number of k-means clusters.
            bits: the allowed widths, e.g. [2, 3, 4] (default [2, 3, 4]).
            scope: model (one clustering) or layer (one per MoE layer).
            log_scores: cluster on log-scores.
            target_bits: budget only: average bits per expert weight.
            uniform_bits: uniform only: the width of every expert.
            group_size: weights per scale group (32, 64, 128).
            base_bits: bits of attention, dense MLP and shared experts (16: unquantized).
            snap: one width per layer for fused engines: none | mean | max | min.
            probes: the scores' probes, as for profile.
            closed_form: the scores' closed form, as for profile.
            trust_remote_code: as for load_model.
            target_gb: budget only: the total size in GB (instead of target_bits).
            seed: the allocation's seed (random, k-means initialisation).
        """
        settings = st.AllocSettings.of(method, clusters, bits, scope, log_scores, target_bits,
                                       uniform_bits, group_size, base_bits, snap, seed,
                                       target_gb)
        entry, score = self._setup(source, trust_remote_code, score_method, probes,
                                   closed_form, settings)
        judged = view.judge_method(score_method, settings.method)
        judge = st.profile(entry, st.ScoreSpec(judged, probes, closed_form))[0]
        alloc = st.allocate(entry, score, settings, judge=judge)
        note = view.budget_note(settings.method, settings.target_bits, settings.bits)
        return {**alloc.to_json(), "score_method": score.method, "judge_method": judged,
                "warnings": [note.strip().replace("*", "").lstrip("⚠ ")] if note else [],
                "clusters": alloc.bitmap.clusters_table(score.scores)}

    def quantize_evaluate(self, source: str = st.EMBEDDED, score_method: str = D.SCORE_METHOD,
                          method: str = D.ALLOC_METHOD, clusters: int = D.CLUSTERS,
                          bits: list[int] | None = None, scope: str = D.SCOPE,
                          log_scores: bool = False, target_bits: float = D.TARGET_BITS,
                          uniform_bits: int = D.UNIFORM_BITS, group_size: int = D.GROUP_SIZE,
                          base_bits: int = D.BASE_BITS, snap: str = D.NO_SNAP,
                          mode: str = D.QUANT_MODE, pairs: int = D.QUICK_PAIRS, probes: int = 0,
                          closed_form: bool = D.PAGE_CLOSED_FORM,
                          trust_remote_code: bool = False, seed: int = D.SEED,
                          target_gb: float | None = None) -> dict:
        """Quantize with the allocation, then evaluate baseline and quantized on quick MME.

        Args:
            source: the model source, as for load_model.
            score_method: as for allocate.
            method: as for allocate.
            clusters: as for allocate.
            bits: as for allocate.
            scope: as for allocate.
            log_scores: as for allocate.
            target_bits: as for allocate.
            uniform_bits: as for allocate.
            group_size: as for allocate.
            base_bits: as for allocate.
            snap: as for allocate.
            mode: rtn (round to nearest, data-free) or tuned (SignRound on local data).
            pairs: image pairs of the quick MME subset.
            probes: as for allocate.
            closed_form: as for allocate.
            trust_remote_code: as for load_model.
            seed: the run's seed: the allocation's (as for allocate) and, in tuned mode,
                SignRound's (same settings and seed, same run).
            target_gb: as for allocate.
        """
        settings = st.AllocSettings.of(method, clusters, bits, scope, log_scores, target_bits,
                                       uniform_bits, group_size, base_bits, snap, seed,
                                       target_gb)
        entry, score = self._setup(source, trust_remote_code, score_method, probes,
                                   closed_form, settings)
        alloc = st.allocate(entry, score, settings, with_pareto=False)
        run = st.quantize_evaluate(entry, alloc, settings, mode, pairs, seed=seed)
        return tables.run_summary(run, pairs)

    def _setup(self, source, trust, score_method, probes, closed_form, settings):
        entry = self.models.get(source, trust)
        spec = st.ScoreSpec(settings.score_method(score_method), probes, closed_form)
        score, _ = st.profile(entry, spec)
        return entry, score
