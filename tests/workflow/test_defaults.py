"""The defaults are written once: the CLI, RunSpec, the stage configs and the API read them."""

import dataclasses
import inspect

import pytest

from mopeq.cli import build_parser
from mopeq.core import defaults as D
from mopeq.core import methods
from mopeq.core.errors import MopeqError
from mopeq.workflow.spec import SNAP_RULES, CalibConfig, RunSpec

# option -> the default every sub-command that has it must show (None: per command below)
CLI_DEFAULTS = {
    "--group-size": D.GROUP_SIZE, "--base-bits": D.BASE_BITS, "--bits": D.BITS,
    "--clusters": D.CLUSTERS, "--scope": D.SCOPE, "--uniform-bits": D.UNIFORM_BITS,
    "--seed": D.SEED, "--mode": D.QUANT_MODE, "--iters": D.QUANT_ITERS,
    "--max-cost-s": D.MAX_COST_S, "--n-batches": D.CALIB_BATCHES,
    "--batch-size": D.CALIB_BATCH_SIZE, "--targets": D.REPORT_TARGETS,
    "--random-seeds": D.RANDOM_SEEDS, "--dataset": D.DATASET, "--pairs": None,
    "--target-gb": None, "--snap": None, "--model": D.MODEL_SOURCE,
}
METHOD_DEFAULTS = {"profile": D.SCORE_METHOD, "allocate": D.ALLOC_METHOD}


def _subparsers() -> dict:
    parser = build_parser()
    return next(a for a in parser._actions if a.dest == "command").choices


def _defaults(sub) -> dict:
    return {opt: a.default for a in sub._actions for opt in a.option_strings}


@pytest.mark.parametrize("command", list(_subparsers()))
def test_every_cli_option_shows_the_one_default(command):
    found = _defaults(_subparsers()[command])
    checked = {opt: found[opt] for opt in CLI_DEFAULTS if opt in found}
    assert checked == {opt: CLI_DEFAULTS[opt] for opt in checked}
    if command in METHOD_DEFAULTS:
        assert found["--method"] == METHOD_DEFAULTS[command]


def test_the_shared_options_are_where_they_belong():
    subs = {name: _defaults(sp) for name, sp in _subparsers().items()}
    with_group = {name for name, opts in subs.items() if "--group-size" in opts}
    assert with_group == {"profile", "allocate", "memory", "quantize", "study",
                          "sensitivity-report"}
    assert {name for name, opts in subs.items() if "--base-bits" in opts} == {
        "allocate", "memory", "quantize"}
    assert {name for name, opts in subs.items() if "--clusters" in opts} == {"allocate"}


def test_runspec_defaults_are_the_table():
    spec = RunSpec()
    assert (spec.score_method, spec.alloc_method, spec.clusters, spec.bits, spec.scope) == (
        D.SCORE_METHOD, D.ALLOC_METHOD, D.CLUSTERS, D.BITS, D.SCOPE)
    assert (spec.group_size, spec.base_bits, spec.sym, spec.mode, spec.iters) == (
        D.GROUP_SIZE, D.BASE_BITS, D.SYM, D.QUANT_MODE, D.QUANT_ITERS)
    assert (spec.target_bits, spec.uniform_bits, spec.seed, spec.quant_seed) == (
        D.TARGET_BITS, D.UNIFORM_BITS, D.SEED, D.SEED)
    assert (spec.closed_form, spec.max_cost_s, spec.dataset) == (
        D.CLOSED_FORM, D.MAX_COST_S, D.DATASET)


def test_the_stage_configs_built_from_the_default_spec_are_their_own_defaults():
    from mopeq.allocation.allocate import AllocConfig
    from mopeq.core.memory import MemoryConfig
    from mopeq.quantize.autoround import QuantConfig
    from mopeq.sensitivity.profile import ProfileConfig
    from mopeq.sensitivity.report import ReportConfig

    spec = RunSpec()
    assert spec.memory_config() == MemoryConfig()
    assert spec.quant_config() == QuantConfig()
    assert spec.profile_config() == ProfileConfig()
    assert spec.calib_config() == CalibConfig()
    # the default spec allocates by k-means: no budget target enters its config
    assert spec.alloc_config() == AllocConfig()
    report = ReportConfig()
    assert (report.n_batches, report.batch_size, report.targets, report.bits,
            report.group_size) == (D.CALIB_BATCHES, D.CALIB_BATCH_SIZE, D.REPORT_TARGETS,
                                   D.BITS, D.GROUP_SIZE)


def test_the_cli_tables_match_the_library():
    from mopeq.allocation import allocate

    assert allocate.METHODS == methods.ALLOC_NAMES
    assert tuple(_subparsers()["allocate"]._option_string_actions["--method"].choices) == (
        methods.ALLOC_NAMES)
    assert tuple(_subparsers()["allocate"]._option_string_actions["--snap"].choices) == (
        SNAP_RULES)
    assert tuple(_subparsers()["profile"]._option_string_actions["--method"].choices) == (
        methods.NAMES)


def test_the_app_settings_and_the_api_read_the_table():
    from mopeq.app import state as st
    from mopeq.app.api import Api

    assert st.AllocSettings().spec() == RunSpec()
    assert st.AllocSettings.of() == st.AllocSettings()
    assert st.ScoreSpec().run_spec() == RunSpec(closed_form=D.PAGE_CLOSED_FORM)
    params = inspect.signature(Api.quantize_evaluate).parameters
    shown = {name: p.default for name, p in params.items() if name != "self"}
    assert shown["pairs"] == D.QUICK_PAIRS and shown["mode"] == D.QUANT_MODE
    assert shown["clusters"] == D.CLUSTERS and shown["group_size"] == D.GROUP_SIZE
    alloc = inspect.signature(Api.allocate).parameters
    assert alloc["target_gb"].default is None and alloc["seed"].default == D.SEED


@pytest.mark.parametrize("changes,message", [
    ({"bits": ()}, "no bit width"),
    ({"bits": (2, 17)}, "ints in 1..16"),
    ({"score_method": "magic"}, "unknown sensitivity method"),
    ({"clusters": 0}, "clusters must be"),
    ({"snap": "median"}, "snap 'median'"),
    ({"mode": "fast"}, "mode 'fast'"),
    ({"pairs": 0}, "pairs must be >= 1"),
])
def test_a_bad_spec_is_a_user_error_naming_the_problem(changes, message):
    with pytest.raises(MopeqError, match=message):
        RunSpec(**changes)


@pytest.mark.parametrize("changes,build,message", [
    ({"alloc_method": "magic"}, "alloc_config", "method 'magic'"),
    ({"alloc_method": "budget", "target_bits": None}, "alloc_config", "exactly one"),
    ({"group_size": 0}, "memory_config", "group_size"),
])
def test_a_stage_config_error_is_a_user_error_too(changes, build, message):
    with pytest.raises(MopeqError, match=message):
        getattr(RunSpec(**changes), build)()


def test_spec_normalises_what_the_widgets_send():
    spec = RunSpec(bits=[4, 2, 4], snap="none")
    assert spec.bits == (2, 4) and spec.snap is None
    assert dataclasses.replace(spec, snap="max").snap == "max"
    budget = RunSpec(alloc_method="budget", target_gb=0.5).alloc_config()
    assert budget.target_gb == 0.5 and budget.target_bits is None  # GB wins over the default
    assert RunSpec(alloc_method="frequency").allocation_score_method == "frequency"
    assert RunSpec(score_method="hessian").allocation_score_method == "hessian"
