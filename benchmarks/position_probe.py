"""Can a short extra phase teach the embedded model the ``position`` category? (validation split)

    python benchmarks/position_probe.py --out DIR [--steps 1000] [--lr 1e-3]
                                        [--position-weight 5] [--relation-captions]
                                        [--caption-weight 0.5] [--absolute-questions 0.5]
                                        [--position-code 8] [--relation-weight 1]
                                        [--object-weight 1] [--gather-weight 1]
                                        [--relation-layer 3] [--object-layer 2]
                                        [--gather-layer 3] [--model DIR]

Takes a model with its outlier channels undone (the trained weights, bit for bit): ``--model``,
by default the shipped one — which has had phase 1 already; the README's attempts started
from an earlier release's 1-thread run, phase 0 only, which ``git show
d3bf81a:assets/tiny-moe-vlm/<file>`` gives back (config.json, model.safetensors and the
tokenizer files into one folder) — and adds one warmup-stable-decay phase (warmup 50, the
last half decaying) that draws ``position`` images with weight ``--position-weight`` (the
recipe's phase 0: 1.5; the other categories keep theirs, 0.8-2.2), and prints the validation
curve (``eval_split(40, seed=1)``: 40 images per category) every 200 steps. With
``--relation-captions`` each ``position`` image's caption starts with the relation its "Yes"
question states ("red circle left of blue square ."), so the relation is also a generation
target. With ``--absolute-questions F`` a fraction F of the ``position`` training images asks
instead where the first named object is in the image ("Is the red circle left in the image?"
/ "... right ..."; or top / bottom): a question with a first-order answer, as a step towards
the relation. ``--position-code S`` adds S x one-hot(row) and S x one-hot(column) to the
vision tower's learned position embedding before the phase (its trained one is ~2.5 in norm
against ~19 for the features: the tokens hardly say where they are). The last three add
training-only probes (``embedded.training.position_heads``, not saved) that give each step of
the answer a first-order target: ``--relation-weight`` whether the first object comes first
along the asked axis, read at the answer token; ``--object-weight`` each named object's cell,
read at its name after the image; ``--gather-weight`` both cells again at the answer token
(``--*-layer``: which hidden state each reads; the model has 4 layers). Writes only under
``--out`` (never ``assets/``); the result is not the shipped model.
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


def absolute_question(sample, index: int):
    """``sample`` asked where its first object is (the half of the image along one axis)."""
    a = sample.scene.objects[0]
    name = f"{a.color} {a.shape}"
    halves = ("left", "right", "col") if index % 2 == 0 else ("top", "bottom", "row")
    true = halves[0] if getattr(a, halves[2]) < 2 else halves[1]
    false = halves[1] if true == halves[0] else halves[0]
    cls = type(sample.questions[0])
    return dataclasses.replace(sample, questions=(
        cls(f"Is the {name} {true} in the image?", "Yes"),
        cls(f"Is the {name} {false} in the image?", "No")))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--model", default=None, help="a tiny VLM folder (default: the shipped one)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--position-weight", type=float, default=5.0)
    p.add_argument("--relation-captions", action="store_true")
    p.add_argument("--caption-weight", type=float, default=0.5)
    p.add_argument("--absolute-questions", type=float, default=0.0)
    p.add_argument("--position-code", type=float, default=0.0)
    p.add_argument("--relation-weight", type=float, default=0.0)
    p.add_argument("--relation-layer", type=int, default=None)
    p.add_argument("--object-weight", type=float, default=0.0)
    p.add_argument("--object-layer", type=int, default=None)
    p.add_argument("--gather-weight", type=float, default=0.0)
    p.add_argument("--gather-layer", type=int, default=None)
    args = p.parse_args()
    out = Path(args.out).resolve()
    assets = Path(__file__).resolve().parent.parent / "assets"
    if out == assets or assets in out.parents:
        sys.exit("--out must not be under assets/")
    import torch

    torch.set_num_threads(1)
    from mopeq.embedded import outliers, synthetic, training
    from mopeq.embedded.tiny import DEFAULT_PHASES, VALIDATION_SEED, Phase, TinyRecipe, load, save
    from mopeq.model.loading import EMBEDDED_DIR

    trained = out / "trained"
    model, processor = load(args.model or EMBEDDED_DIR)
    gains = model.config.channel_gains
    outliers.spread_channels(model.language_model, gains["exponents"], gains["seed"], undo=True)
    model.config.channel_gains = None
    save(model.eval(), processor, trained)
    if args.relation_captions or args.absolute_questions:  # the position images, anew
        stream = synthetic.train_stream

        def changed(*a, **k):
            for index, sample in enumerate(stream(*a, **k)):
                if sample.category == "position":
                    if (index * 0.6180339887) % 1.0 < args.absolute_questions:
                        sample = absolute_question(sample, index)
                    elif args.relation_captions:
                        sample = relation_caption(sample)
                yield sample

        training.synthetic.train_stream = changed
    weights = dict(DEFAULT_PHASES[0].weights)
    weights["position"] = args.position_weight
    probes = (("relation", args.relation_weight), ("cells", args.object_weight),
              ("gather", args.gather_weight))
    phase = Phase(steps=args.steps, lr=args.lr, warmup=50, decay_fraction=0.5, stream_seed=2,
                  weights=tuple(weights.items()), position_code=args.position_code,
                  probes=tuple((k, w) for k, w in probes if w))
    recipe = TinyRecipe(phases=(DEFAULT_PHASES[0], phase), caption_weight=args.caption_weight,
                        relation_layer=args.relation_layer, object_layer=args.object_layer,
                        gather_layer=args.gather_layer)
    start = time.time()

    def progress(step, message):
        if message.startswith("{"):
            point = json.loads(message)
            cats = point["per_category"]
            print(f"{time.time() - start:6.0f} s  step {point['step']:5d}  total "
                  f"{point['score']:.0f}  position {cats['position']:.0f}  count "
                  f"{cats['count']:.0f}  landmark {cats['landmark']:.0f}"
                  + "".join(f"  {k} loss {point[k]:.3f}" for k in ("relation", "cells", "gather")
                            if k in point),
                  flush=True)

    training.train(out / "model", recipe, init_from=trained, start_phase=1, eval_every=200,
                   eval_pairs=40, on_progress=progress)
    from mopeq.evaluation.adapters import TinyVLMAdapter
    from mopeq.evaluation.evaluate import evaluate_samples

    model, processor = load(out / "model")  # as saved (bf16), with 95 % intervals
    result = evaluate_samples(TinyVLMAdapter(model.eval(), processor),
                              synthetic.eval_split(40, seed=VALIDATION_SEED))
    pos = result.per_category["position"]
    print(f"saved model: total {result.score:.0f} {[round(x) for x in result.score_ci95]}, "
          f"position {pos['score']:.0f} {[round(x) for x in pos['ci95']]}")


if __name__ == "__main__":
    main()
