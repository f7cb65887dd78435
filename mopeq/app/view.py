"""What the page shows and when: controls that apply, one size unit, notes, change tracking.

Pure helpers for the page's handlers (no gradio, no torch): which controls a method uses, the
size unit of a model's views, the notes the page adds (a capped budget, a failed load, a queued
run), readable tables, and ``Drawn``, which remembers what each output last showed so a live event
re-sends only what changed.
"""

from __future__ import annotations

import hashlib
import math
from typing import TYPE_CHECKING, Any

from mopeq.core import defaults as D
from mopeq.core import methods

if TYPE_CHECKING:
    import pandas as pd

UNITS = {"MB": 1e6, "GB": 1e9}  # decimal, like mopeq.core.memory (plots.UNITS: plotly stays lazy)


def unit_for(n_bytes: float) -> str:
    """The one size unit of a model's views: MB below 1 GB (the embedded model), else GB."""
    return "MB" if n_bytes < UNITS["GB"] else "GB"  # as plots.unit_for (plotly stays unloaded)


def size_text(n_bytes: float, unit: str) -> str:
    """Bytes in ``unit``, three decimals for MB, two for GB."""
    return f"{n_bytes / UNITS[unit]:.{3 if unit == 'MB' else 2}f} {unit}"


# ------------------------------------------------------------------------ controls


def score_controls(method: str, closed_form: bool) -> dict[str, bool]:
    """Visibility of the sensitivity controls: probes only where a method samples."""
    has_closed_form = methods.info(method).closed_form
    exact = has_closed_form and bool(closed_form)
    return {"probes": method in methods.PROBED and not exact, "closed_form": has_closed_form}


def alloc_controls(method: str) -> dict[str, bool]:
    """Visibility of the allocation controls for ``method``, from its row of the table."""
    info = methods.allocator(method)
    return {"clusters": info.uses_clusters, "scope": info.uses_scope,
            "log_scores": info.uses_clusters, "target_bits": info.uses_target,
            "uniform_bits": info.uses_uniform_bits, "seed": info.seeded,
            "score_source": info.needs_scores and info.score_method is None}


def target_bounds(bits) -> tuple[float, float]:
    """The range a budget's target average can reach with the bit set ``bits``."""
    widths = sorted(int(b) for b in bits or ()) or [2, 8]
    return float(widths[0]), float(widths[-1])


def budget_note(method: str, target: float, bits) -> str:
    """A loud note when a budget target lies outside what the bit set can reach ('' if not)."""
    if not methods.allocator(method).uses_target or not bits:
        return ""
    lo, hi = target_bounds(bits)
    if target > hi + 1e-9:
        return (f"\n\n⚠ **Target {target:g} bits is above the widest width ({hi:g}) in the bit "
                f"set**: every expert gets {hi:g} bits. Tick a wider width to go higher.")
    return ""


def judge_method(score_source: str, method: str) -> str:
    """The scores the predicted loss weighs errors by: a sensitivity, never routing counts."""
    fixed = methods.allocator(method).score_method
    if "frequency" in (fixed, score_source):
        return D.SCORE_METHOD
    return score_source


# ------------------------------------------------------------------------ notes


def empty_source_text(active: str | None) -> str:
    """What the page says when Load is pressed with an empty model box."""
    now = f" The page still works on **{active}**." if active else ""
    return ("⚠ **No model given.** Type `embedded` (the tiny MoE VLM shipped here), a local "
            f"folder, or a Hugging Face hub id, then press Load.{now}")


def load_failed_text(typed: str, message: str, active: str | None) -> str:
    """The layout box after a failed load: why, and which model the page still shows."""
    now = (f"The page still shows **{active}** (the active model)." if active else
           "No model is active.")
    return f"⚠ **Could not load `{typed}`**: {message}\n\n{now}"


ACTIVE = "Active model: "  # before the layout line, which starts with the source in bold


def queue_text(ahead: int | None, typical_s: float | None) -> str:
    """The run box while a quantization waits for another one (one at a time here)."""
    if not ahead:
        return "⏳ Quantizing…"
    eta = (f" A run here takes about {typical_s:.0f} s, so yours should start in about "
           f"{ahead * typical_s:.0f} s." if typical_s else "")
    runs = "run is" if ahead == 1 else "runs are"
    return (f"⏳ **Queued: {ahead} quantization {runs} ahead of yours.** This machine "
            f"quantizes one model at a time (a free CPU: two at once would each take twice as "
            f"long and could run out of memory); yours starts when they finish.{eta}")


# ------------------------------------------------------------------------ tables

RUN_FORMATS = {"avg_bits": "{:.2f}", "ratio_vs_bf16": "{:.2f}×", "score": "{:.1f}",
               "baseline_score": "{:.1f}", "delta": "{:+.1f}", "kl": "{:.4f}",
               "flip_rate": "{:.1%}", "quantize_s": "{:.1f}"}


def _fmt(value: Any, pattern: str) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    return pattern.format(value)


def readable_runs(frame: pd.DataFrame, unit: str) -> pd.DataFrame:
    """The runs table for reading: sizes in ``unit``, fixed decimals; other columns as given."""
    out = frame.copy()
    for col, pattern in RUN_FORMATS.items():
        if col in out:
            out[col] = [_fmt(v, pattern) for v in out[col]]
    if "gb" in out:
        digits = 3 if unit == "MB" else 2
        out["gb"] = [_fmt(v * UNITS["GB"] / UNITS[unit], f"{{:.{digits}f}}") for v in out["gb"]]
        out = out.rename(columns={"gb": f"size ({unit})"})
    return out


def readable(frame: pd.DataFrame, pattern: str = "{:.3g}",
             columns: dict[str, str] | None = None) -> pd.DataFrame:
    """Floats as short strings, intervals as ``[low, high]``, missing values as "–".

    ``columns`` overrides the pattern per column.
    """
    out = frame.copy()
    for col in out.columns:
        fmt = (columns or {}).get(col, pattern)
        out[col] = [_readable_cell(v, fmt) for v in out[col]]
    return out


def _readable_cell(value: Any, pattern: str) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, tuple | list) and all(isinstance(v, int | float) for v in value):
        return "[" + ", ".join(pattern.format(v) for v in value) + "]"
    return _fmt(value, pattern) if isinstance(value, float) else value


# ------------------------------------------------------------------------ change tracking


def fingerprint(*parts: Any) -> str:
    """A short digest of the values that determine an output (arrays by their bytes)."""
    h = hashlib.sha256()
    for part in parts:
        data = part.tobytes() if hasattr(part, "tobytes") else repr(part).encode()
        h.update(data + b"\x00")
    return h.hexdigest()[:20]


class Drawn:
    """What each output of one page last showed, by a key of what determines it.

    ``changed(name, key)`` is True (and remembers ``key``) when the output must be sent again;
    a live event sends ``gr.skip()`` for the others, so the browser redraws only what changed.
    ``shown(name, key)`` records what the browser drew by itself (the clusters preview), and
    ``preview`` is the clusters preview the page holds. ``stamp`` numbers every figure sent, so
    that a figure is never the same JSON as the one before it: a plot whose data the preview
    restyled still holds its previous figure as its value, and gradio redraws a plot only when
    its value changes.
    """

    def __init__(self):
        self.keys: dict[str, str] = {}
        self.preview: dict = {}
        self.sent = 0

    def shown(self, name: str, key: str) -> None:
        """The browser shows ``key`` in ``name`` without the server having sent it."""
        self.keys[name] = key

    def stamp(self, figure):
        """A plotly ``figure`` numbered in ``layout.meta`` (anything else as given)."""
        if hasattr(figure, "update_layout"):
            self.sent += 1
            figure.update_layout(meta={"sent": self.sent})
        return figure

    def changed(self, name: str, key: str) -> bool:
        """Whether ``name`` shows something else than ``key``; remembers ``key``."""
        if self.keys.get(name) == key:
            return False
        self.keys[name] = key
        return True

    def forget(self, *names: str) -> None:
        """Drop what is known about ``names`` (all outputs when none are given)."""
        for name in names or list(self.keys):
            self.keys.pop(name, None)
