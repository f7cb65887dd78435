"""The one method table: every front end reads it, and its recommendation is a real method."""

from mopeq.cli import build_parser
from mopeq.core import methods


def _choices(command: str, option: str) -> tuple:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return tuple(next(a for a in sub._actions if option in a.option_strings).choices)


def test_cli_method_choices_are_the_table():
    assert _choices("profile", "--method") == methods.NAMES


def test_recommended_method_is_data_aware_and_brings_its_own_errors():
    info = methods.info(methods.RECOMMENDED)
    assert info.needs_data and info.provides_errors
    assert methods.RECOMMENDED != "frobenius" and methods.info("frobenius").needs_data is False


def test_every_row_names_a_callable_function():
    assert all(callable(methods.resolve(m.estimator)) for m in methods.TABLE)
    assert all(callable(methods.resolve(m.handler)) for m in methods.ALLOCATORS)


def test_allocation_methods_derive_from_their_table():
    from mopeq.allocation import allocate

    assert allocate.METHODS == methods.ALLOC_NAMES
    assert methods.ALLOC_NAMES == ("kmeans", "budget", "uniform", "frequency", "random",
                                   "inverted")
    assert [m.name for m in methods.ALLOCATORS if m.uses_target] == ["budget"]
    assert _choices("allocate", "--method") == methods.ALLOC_NAMES


def test_error_methods_are_the_rows_that_provide_errors():
    from mopeq.sensitivity import profile

    assert set(profile.ERROR_METHODS) == {"measured", "block_error", "block_fisher"}
