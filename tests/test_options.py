"""The options: one declaration per option (FoldOptions, VerifyOptions), read by the API and the CLI
alike; errors name the API's parameter in Python and the flag on the command line."""

from __future__ import annotations

from dataclasses import FrozenInstanceError, fields
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import bnfold
from bnfold.cli import cli
from bnfold.errors import OptionError
from bnfold.options import FoldOptions, VerifyOptions, flag_of
from models import Builder, calibrate

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "models" / "demo.onnx"


def _model() -> onnx.ModelProto:
    b = Builder(seed=3)
    x = b.input("x", ["N", 3, 8, 8])
    y = b.op("Mul", [b.relu(b.bn(b.conv(x, 3, 4, 3), 4)), b.const(np.full((1, 4, 1, 1), 3.0), "k")])
    return calibrate(b.model(b.bn(y, 4)), {"N": 2})


def test_options_are_frozen_values():
    with pytest.raises(FrozenInstanceError):
        FoldOptions().strict = True  # type: ignore[misc]
    with pytest.raises(FrozenInstanceError):
        VerifyOptions().samples = 5  # type: ignore[misc]


@pytest.mark.parametrize("changes", [{}, {"strict": True}, {"lower_standalone": True, "affine": False}])
def test_options_and_keywords_fold_the_same(changes):
    model = _model()
    by_value, report = bnfold.fold(model, options=FoldOptions(**changes))
    by_keywords, again = bnfold.fold(model, **changes)
    assert by_value.SerializeToString() == by_keywords.SerializeToString()
    assert report.to_dict() == again.to_dict()
    base = FoldOptions(strict=True)
    assert FoldOptions.of(base, affine=False) == FoldOptions(strict=True, affine=False)  # keywords override
    assert bnfold.inspect(model, options=FoldOptions(**changes)).to_dict() == bnfold.inspect(model, **changes).to_dict()


def test_an_unknown_keyword_is_a_type_error():
    with pytest.raises(TypeError, match="unknown FoldOptions field"):
        bnfold.fold(_model(), strickt=True)
    with pytest.raises(TypeError, match="unknown VerifyOptions field"):
        bnfold.verify(_model(), _model(), sample=2)


@pytest.mark.parametrize(
    "keywords, api, flags, cli",
    [
        ({"samples": 0}, "samples: must be at least 1", None, None),
        ({"rtol": float("nan")}, "rtol: must be a finite number >= 0", ["--rtol", "nan"], "--rtol: must be a finite"),
        ({"providers": "gpu"}, "providers: unknown provider 'gpu'", ["--providers", "gpu"], "--providers: unknown"),
        ({"dims": {"zzz": 1}}, "dims: names zzz, not a dynamic dimension", ["--dim", "zzz=1"], "--dim: names zzz"),
        (
            {"input_shapes": {"nope": [1]}},
            "input_shapes: names nope, which the model does not take",
            ["--input-shape", "nope=1"],
            "--input-shape: names nope",
        ),
        (
            {"dims": {"batch": 0}},
            "dims: batch=0: a dimension must be at least 1",
            ["--dim", "batch=0"],
            "--dim: batch=0",
        ),
    ],
    ids=["samples", "rtol", "providers", "dims", "input_shapes", "dims_zero"],
)
def test_errors_name_the_api_parameter_in_python_and_the_flag_on_the_command_line(keywords, api, flags, cli):
    with pytest.raises(OptionError) as caught:
        bnfold.verify(DEMO, DEMO, **keywords)
    assert str(caught.value).startswith(api), caught.value
    assert "--" not in str(caught.value).split(":")[0]
    if flags is not None:
        result = CliRunner().invoke(cli_command(), ["verify", str(DEMO), str(DEMO), *flags])
        assert result.exit_code == 2
        assert result.output.strip().splitlines() == [f"Error: {result.output.strip()[7:]}"]
        assert result.output.startswith(f"Error: {cli}"), result.output


def cli_command():
    return cli


def test_every_field_is_a_flag_and_every_flag_a_field():
    """The CLI's flags are made from the dataclasses: fold takes every FoldOptions and VerifyOptions
    field, verify every VerifyOptions field, each under the flag the field declares."""
    fold = {p.name: p for p in cli.commands["fold"].params}
    verify = {p.name: p for p in cli.commands["verify"].params}
    for f in fields(FoldOptions):
        assert flag_of(f) in fold[f.name].opts, f.name
    for f in fields(VerifyOptions):
        for params in (fold, verify):
            assert flag_of(f) in params[f.name].opts, f.name
    own = {"models", "output", "jobs", "as_json", "quiet", "do_verify", "keep_failed"}
    assert set(fold) - own == {f.name for f in fields(FoldOptions)} | {f.name for f in fields(VerifyOptions)}


def test_the_command_line_defaults_are_the_apis():
    from bnfold.cli import _take

    values = dict(cli.commands["fold"].make_context("fold", ["m.onnx"]).params)
    assert _take(FoldOptions, values) == FoldOptions()
    assert _take(VerifyOptions, values) == VerifyOptions()
    values = dict(
        cli.commands["fold"].make_context("fold", ["m.onnx", "--strict", "--no-affine", "--dim", "N=2"]).params
    )
    assert _take(FoldOptions, values) == FoldOptions(strict=True, affine=False)
    assert _take(VerifyOptions, values) == VerifyOptions(dims={"N": 2})
