"""Can a short extra phase teach the embedded model the ``position`` category? (validation split)

    python benchmarks/position_probe.py --out DIR [--steps 1000] [--lr 1e-3]
                                        [--position-weight 5] [--relation-captions]
                                        [--caption-weight 0.5]

Takes the shipped model with its outlier channels undone (the trained weights, bit for bit),
adds one warmup-stable-decay phase (warmup 50, the last half decaying) that draws ``position``
images with weight ``--position-weight`` (the recipe's phase: 1.5; the other categories keep
theirs, 0.8-2.2), and prints the
validation curve (``eval_split(40, seed=1)``: 40 images per category) every 200 steps. With
``--relation-captions`` each ``position`` image's caption starts with the relation its "Yes"
question states ("red circle left of blue square ."), so the relation is also a generation
target. Writes only under ``--out`` (never ``assets/``); the result is not the shipped model.
This is how the attempts in the README ("Where it stands") were run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout


def relation_caption(sample):
    """``sample`` with the relation of its "Yes" question first in its caption."""
    yes = next(q for q in sample.questions if q.answer == "Yes").text
    relation = yes.lower().removeprefix("is the ").replace(" the ", " ").rstrip("?").strip()
    return dataclasses.replace(sample, caption=f"{relation} . {sample.caption}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--position-weight", type=float, default=5.0)
    p.add_argument("--relation-captions", action="store_true")
    p.add_argument("--caption-weight", type=float, default=0.5)
    args = p.parse_args()
    out = Path(args.out).resolve()
    assets = Path(__file__).resolve().parent.parent / "assets"
    if out == assets or assets in out.parents:
        sys.exit("--out must not be under assets/")
    import torch

    torch.set_num_threads(1)
    from mopeq.embedded import outliers, synthetic, training
    from mopeq.embedded.tiny import DEFAULT_PHASES, Phase, TinyRecipe, load, save
    from mopeq.model.loading import EMBEDDED_DIR

    trained = out / "trained"
    model, processor = load(EMBEDDED_DIR)
    gains = model.config.channel_gains
    outliers.spread_channels(model.language_model, gains["exponents"], gains["seed"], undo=True)
    model.config.channel_gains = None
    save(model.eval(), processor, trained)
    if args.relation_captions:  # the training stream's position images, captioned anew
        stream = synthetic.train_stream

        def relations(*a, **k):
            for sample in stream(*a, **k):
                yield relation_caption(sample) if sample.category == "position" else sample

        training.synthetic.train_stream = relations
    weights = dict(DEFAULT_PHASES[0].weights)
    weights["position"] = args.position_weight
    phase = Phase(steps=args.steps, lr=args.lr, warmup=50, decay_fraction=0.5, stream_seed=2,
                  weights=tuple(weights.items()))
    recipe = TinyRecipe(phases=(DEFAULT_PHASES[0], phase), caption_weight=args.caption_weight)
    start = time.time()

    def progress(step, message):
        if message.startswith("{"):
            point = json.loads(message)
            cats = point["per_category"]
            print(f"{time.time() - start:6.0f} s  step {point['step']:5d}  total "
                  f"{point['score']:.0f}  position {cats['position']:.0f}  count "
                  f"{cats['count']:.0f}  landmark {cats['landmark']:.0f}", flush=True)

    training.train(out / "model", recipe, init_from=trained, start_phase=1, eval_every=200,
                   eval_pairs=40, on_progress=progress)


if __name__ == "__main__":
    main()
