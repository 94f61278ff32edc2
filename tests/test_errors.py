"""The error tree and the exit-status table: every error has a code and a message, the
tree drawn in errors.py's docstring is the real one, and statuses come from one table."""

import importlib
import inspect
import pkgutil
import re

import pytest

from batchtag import codes, errors
from batchtag.config import build_config
from batchtag.pipeline.progress import Summary
from batchtag.pipeline.sink import open_sink
from batchtag.pipeline.sources import check_source

ALL_ERRORS = [
    obj for obj in vars(errors).values() if inspect.isclass(obj) and issubclass(obj, errors.BatchtagError)
]


def drawn_tree() -> dict[str, str]:
    """{class: parent} as drawn in the module docstring (the column of a name is its depth)."""
    parents: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    for line in errors.__doc__.splitlines():
        match = re.search(r"[├└]── (\w+)", line) or re.match(r"\s*(BatchtagError)\b", line)
        if not match:
            continue
        column = match.start(1)
        while stack and stack[-1][0] >= column:
            stack.pop()
        if stack:
            parents[match.group(1)] = stack[-1][1]
        stack.append((column, match.group(1)))
    return parents


def test_the_docstring_draws_the_real_tree():
    real = {cls.__name__: cls.__bases__[0].__name__ for cls in ALL_ERRORS if cls is not errors.BatchtagError}
    assert drawn_tree() == real


def all_subclasses(cls: type) -> set[type]:
    return {sub for direct in cls.__subclasses__() for sub in (direct, *all_subclasses(direct))}


def test_every_error_of_the_tree_lives_in_errors_py():
    """Imported, every module under batchtag/ defines no BatchtagError of its own: the
    drawn tree is the whole tree."""
    import batchtag

    for module in pkgutil.walk_packages(batchtag.__path__, "batchtag."):
        if not module.name.endswith("__main__"):
            importlib.import_module(module.name)
    elsewhere = sorted(
        f"{cls.__module__}.{cls.__name__}"
        for cls in all_subclasses(errors.BatchtagError)
        if cls.__module__ != "batchtag.errors"
    )
    assert elsewhere == []


@pytest.mark.parametrize(
    "error",
    [
        errors.ConfigError("bad"),
        errors.SourceError("bad"),
        errors.SinkError("bad"),
        errors.SummaryError("bad"),
        errors.CredentialsRefused(codes.SIGNATURE_FAILED, "signature check failed"),
        errors.EndpointUnreachable("bad"),
        errors.InputError(codes.CLIENT_INPUT_ERROR, "file not found"),
        errors.ApiFailure(codes.CLIENT_HTTP_ERROR, "HTTP 503", 503),
        errors.ApiError(codes.IMAGE_TOO_LARGE, "request body over 16 bytes"),
        errors.SignatureError(codes.SIGNATURE_EXPIRED),
    ],
)
def test_every_error_carries_a_known_code_and_its_message(error):
    assert isinstance(error, errors.BatchtagError)
    assert codes.describe(error.code).message != f"unknown code {error.code}"
    assert error.message and str(error) == error.message


def test_api_error_answers_with_the_tables_message_then_the_detail():
    assert errors.ApiError(codes.IMAGE_TOO_LARGE, "over 16").message == "image too large: over 16"
    assert errors.ApiError(codes.NO_SOURCE).message == codes.message(codes.NO_SOURCE)
    assert errors.SignatureError(codes.SIGNATURE_EXPIRED).message == "signature expired"


def test_exit_statuses_come_from_the_table():
    assert [errors.exit_status(o) for o in errors.Outcome] == [0, 1, 3, 4, 130, 5]
    assert errors.exit_status(errors.SinkError("x")) == errors.exit_status(errors.ConfigError) == 2
    assert errors.exit_status(errors.SummaryError("x")) == 2
    assert errors.exit_status(errors.CredentialsRefused(codes.SIGNATURE_FAILED, "m")) == 2
    assert errors.exit_status(errors.EndpointUnreachable("x")) == 2
    assert errors.exit_status(KeyboardInterrupt()) == 130
    with pytest.raises(KeyError):
        errors.exit_status(ValueError("a bug is not given a status"))


def test_summary_outcome_decides_its_exit_code():
    assert Summary().exit_code == 3  # no items found
    assert Summary(found=1).exit_code == 0
    assert Summary(found=1, errors=1, new_errors=1, open_errors=1).outcome is errors.Outcome.SOME_FAILED
    assert Summary(errors=1, interrupted=True).exit_code == 130
    assert Summary(found=9, errors=1, limit_reached=True).exit_code == 5  # --max-requests


@pytest.mark.parametrize(
    ("fail_on", "new_errors", "open_errors", "status"),
    [
        ("any", 0, 0, 0),
        ("any", 2, 2, 1),
        ("any", 0, 3, 4),  # old errors (or failed again): OUT holds them
        ("new", 0, 3, 0),
        ("new", 2, 5, 1),
        ("none", 2, 5, 0),
        ("none", 0, 5, 0),
    ],
)
def test_fail_on_chooses_which_outcomes_fail(fail_on, new_errors, open_errors, status):
    summary = Summary(found=5, errors=new_errors, new_errors=new_errors, open_errors=open_errors)
    summary.fail_on = fail_on
    assert summary.exit_code == status
    assert Summary(found=0, fail_on=fail_on).exit_code == 3  # never chosen away
    assert Summary(found=5, interrupted=True, fail_on=fail_on).exit_code == 130


def test_the_exit_table_lists_every_outcome_once_in_status_order():
    rows = errors.exit_rows()
    assert [status for status, _, _ in rows] == sorted({0, 1, 2, 3, 4, 5, 130})
    assert {errors.Outcome(when) for _, when, _ in rows if when in {o.value for o in errors.Outcome}} == set(
        errors.Outcome
    )


def test_the_modules_raise_errors_of_the_tree(tmp_path):
    with pytest.raises(errors.ConfigError):
        build_config({"sources": ["x"], "out": "o", "concurrency": 0})
    with pytest.raises(errors.SourceError):
        check_source(str(tmp_path / "missing"))
    with pytest.raises(errors.SinkError) as caught:
        open_sink(str(tmp_path))
    assert caught.value.code == codes.RUN_OUT_ERROR
