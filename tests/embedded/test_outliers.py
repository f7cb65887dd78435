"""The outlier-channel rescale: exact for the 16-bit model, visible to round-to-nearest."""

import numpy as np
import pytest
import torch

from mopeq.core.errors import MopeqError
from mopeq.embedded import outliers, tiny
from mopeq.embedded.synthetic import eval_split

RECIPE = tiny.TinyRecipe(hidden_size=32, num_layers=2, num_experts=4, expert_ffn=32)


def _model():
    model, processor = tiny.new_model(RECIPE)
    samples = eval_split(2)[:6]
    batch = processor([s.image for s in samples], [s.questions[0].text for s in samples])
    return model.eval(), batch


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                     attention_mask=batch.get("attention_mask")).logits


def test_the_rescale_leaves_every_logit_bit_identical():
    model, batch = _model()
    before = _logits(model, batch)
    norm = model.language_model.model.layers[0].post_attention_layernorm.weight.clone()
    u = outliers.spread_channels(model.language_model, [(-3, 0), (1, 0, -1)], seed=4)
    after = _logits(model, batch)
    assert torch.equal(before, after)  # powers of two: not one rounding changes
    assert u.shape == (2, 32) and set(u[0].tolist()) <= {-3.0, 0.0}
    assert set(u[1].tolist()) <= {1.0, 0.0, -1.0}
    ratio = model.language_model.model.layers[0].post_attention_layernorm.weight / norm
    assert torch.equal(ratio, 2.0 ** u[0])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    outliers.spread_channels(model.language_model, [(-3, 0), (1, 0, -1)], seed=4)
    outliers.spread_channels(model.language_model, [(-3, 0), (1, 0, -1)], seed=4, undo=True)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # undone


def _rtn(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric round-to-nearest with one scale per row (the group is the whole row)."""
    scale = w.abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 0.5)
    return (w / scale).round().clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * scale


def test_round_to_nearest_errs_more_after_the_rescale():
    """Same function, but a row's scale now comes from its large columns: the error (weighted
    by the activations each column sees) grows, and grows faster at fewer bits."""
    model, _ = _model()
    experts = model.language_model.model.layers[0].mlp.experts
    w = experts.gate_up_proj.detach().clone()
    u = outliers.spread_channels(model.language_model, [(-3, 0, 0, 0)], seed=0)[0]
    w2 = experts.gate_up_proj.detach()
    gain = 2.0 ** u  # activations of the rescaled model are the old ones times the gain

    def error(weights, g, bits):
        return float(((_rtn(weights, bits) - weights) * g).norm() / (weights * g).norm())

    ratios = [error(w2, gain, b) / error(w, torch.ones_like(gain), b) for b in (4, 3, 2)]
    assert all(r > 1.5 for r in ratios), ratios


def test_applied_once_and_recorded_in_the_config():
    model, batch = _model()
    assert outliers.apply_to(model, ((-2, 0),), seed=0)
    once = [p.clone() for p in model.parameters()]
    assert model.config.channel_gains == {"exponents": [[-2, 0]], "seed": 0}
    assert not outliers.apply_to(model, ((-2, 0),), seed=0)  # a resumed run: no second time
    assert all(torch.equal(a, b) for a, b in zip(once, model.parameters(), strict=True))
    assert not outliers.apply_to(tiny.new_model(RECIPE)[0], (), seed=0)


@pytest.mark.parametrize("bad", [[], [()], [(0.5, 0)]])
def test_bad_exponents_are_refused(bad):
    with pytest.raises(MopeqError, match="whole numbers"):
        outliers.draw_exponents(2, 8, bad, seed=0)


def test_draws_are_seeded():
    a = outliers.draw_exponents(3, 16, [(-2, 0, 0, 0)], seed=5)
    b = outliers.draw_exponents(3, 16, [(-2, 0, 0, 0)], seed=5)
    assert torch.equal(a, b) and np.unique(a.numpy()).tolist() == [-2.0, 0.0]


def test_a_model_without_moe_layers_is_refused():
    with pytest.raises(MopeqError, match="no OLMoE-style MoE layer"):
        outliers.spread_channels(torch.nn.Linear(4, 4), [(0,)], seed=0)


def test_a_block_with_shared_experts_is_refused_not_changed():
    """DeepSeek-V2's shared experts read the normed input too: refuse rather than alter it."""
    import dataclasses

    model, _ = tiny.new_model(dataclasses.replace(RECIPE, language_model="deepseek_v2"))
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(MopeqError, match="shared_experts"):
        outliers.spread_channels(model.language_model, [(-2, 0)], seed=0)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_training_a_recipe_the_rescale_cannot_take_fails_before_it_trains(tmp_path):
    import dataclasses

    from mopeq.embedded import training

    recipe = dataclasses.replace(RECIPE, language_model="deepseek_v2", batch_images=2).scaled(2)
    with pytest.raises(MopeqError, match="shared_experts"):
        training.train(tmp_path, recipe, eval_every=1, eval_pairs=2)
    assert not (tmp_path / "config.json").exists()
    plain = dataclasses.replace(recipe, channel_exponents=())
    log = training.train(tmp_path, plain, eval_every=1, eval_pairs=2)
    assert "channel_gains" not in log and len(log["curve"]) == 2
