"""The ``bnfold`` command: parse, call the Python API, render. Nothing else."""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import Dict, List, Optional

import click

from . import __version__
from .api import default_output, fold_file
from .errors import BnfoldError

class UserError(click.ClickException):
    exit_code = 2


class BnfoldGroup(click.Group):
    """User errors become one line with exit code 2; anything unexpected is a bug: exit code 3."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except BnfoldError as exc:
            raise UserError(str(exc)) from None
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception:
            click.echo(traceback.format_exc(), err=True)
            click.echo(
                f"Error: internal error in bnfold {__version__}, a bug rather than a problem with your input. "
                "Please report it to the bnfold issue tracker with the traceback above and the bnfold version.",
                err=True,
            )
            ctx.exit(3)


def _pairs(values, what: str) -> Dict[str, str]:
    out = {}
    for v in values:
        name, sep, rest = v.rpartition("=")
        if not sep or not name or not rest:
            raise click.BadParameter(f"expected NAME=VALUE, got '{v}'", param_hint=what)
        out[name] = rest
    return out


def _verify_kwargs(o: dict) -> dict:
    try:
        dims = {k: int(v) for k, v in _pairs(o["dim"], "--dim").items()}
        shapes = {k: [int(d) for d in v.split(",")] for k, v in _pairs(o["input_shape"], "--input-shape").items()}
    except ValueError:
        raise click.BadParameter("sizes must be integers", param_hint="--dim/--input-shape") from None
    return dict(
        providers=[p for p in o["providers"].split(",") if p],
        rtol=o["rtol"], atol=o["atol"], samples=o["samples"], seed=o["seed"], dims=dims,
        input_shapes=shapes, inputs=o["inputs"], per_layer=o["per_layer"],
        graph_optimization=o["graph_optimization"], allow_tf32=o["allow_tf32"],
    )


VERIFY_OPTIONS = [
    click.option("--providers", default="cpu", show_default=True, help="Comma-separated: cpu, cuda."),
    click.option("--rtol", type=float, default=None, help="Relative tolerance (default by dtype: float32 1e-4, float16 1e-2)."),
    click.option("--atol", type=float, default=None, help="Absolute tolerance (default by dtype: float32 1e-5, float16 1e-3)."),
    click.option("--samples", type=click.IntRange(min=1), default=3, show_default=True, help="Random input samples to compare."),
    click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random inputs."),
    click.option("--dim", multiple=True, metavar="NAME=SIZE", help="Size of a named dynamic dimension (default 1). Repeatable."),
    click.option("--input-shape", multiple=True, metavar="NAME=D1,D2,...", help="Full shape of one input. Repeatable."),
    click.option("--inputs", type=click.Path(dir_okay=False), default=None, help="Use these arrays (.npz, keyed by input name)."),
    click.option("--per-layer", is_flag=True, help="Also compare every BatchNormalization output; name the first that diverges."),
    click.option("--graph-optimization", type=click.Choice(["disable", "basic", "extended", "all"]), default="disable",
                 show_default=True, help="onnxruntime optimization level for the candidate (the reference always runs with none)."),
    click.option("--allow-tf32", is_flag=True, help="On CUDA, allow TF32 math (tolerances widened to match)."),
]


def verify_options(f):
    for option in reversed(VERIFY_OPTIONS):
        f = option(f)
    return f


def _run_verify(original, candidate, kwargs: dict):
    from .verify import verify  # imports onnxruntime: only when a command verifies

    if not sys.stderr.isatty():
        return verify(original, candidate, **kwargs)
    with click.progressbar(length=kwargs["samples"], label="verifying", file=sys.stderr) as bar:
        return verify(original, candidate, progress=lambda k: bar.update(1), **kwargs)


@click.group(cls=BnfoldGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="bnfold")
def cli() -> None:
    """Fold BatchNormalization into neighbouring layers of ONNX models, and verify the result."""


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where to write the folded model (default: MODEL_folded.onnx beside MODEL).")
@click.option("--dry-run", is_flag=True, help="Decide and report, write nothing.")
@click.option("--lower-standalone", is_flag=True, help="Turn BNs that can fold nowhere into Mul + Add by per-channel constants.")
@click.option("--external-data/--no-external-data", default=None,
              help="Write weights to OUT.data beside the output, or inline (default: as the input, or external over 2 GB).")
@click.option("--in-place", is_flag=True, help="Allow the output to replace MODEL (still written atomically).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON document.")
@click.option("--verify", "do_verify", is_flag=True, help="Verify the folded model against MODEL right after folding.")
@verify_options
def fold(model: Path, output: Optional[Path], dry_run: bool, lower_standalone: bool, external_data: Optional[bool],
         in_place: bool, as_json: bool, do_verify: bool, **verify_opts) -> None:
    """Fold every inference BatchNormalization of MODEL that can fold without changing meaning.

    Each BN left in the model is reported with a reason code. Exit codes: 0 done (and verified, with
    --verify), 1 verification failed, 2 bad input or usage.
    """
    kwargs = _verify_kwargs(verify_opts) if do_verify else None
    out_path = output or (model if in_place else default_output(model))
    if kwargs is not None and in_place and not dry_run:
        raise UserError("--verify needs the original: it cannot be combined with --in-place")
    report = fold_file(model, out_path, dry_run=dry_run, lower_standalone=lower_standalone,
                       external_data=external_data, in_place=in_place)
    result = None
    if kwargs is not None and not dry_run:
        result = _run_verify(model, out_path, kwargs)
    if as_json:
        doc = report.to_dict()
        if result is not None:
            doc = {"fold": doc, "verify": result.to_dict()}
        click.echo(json.dumps(doc, indent=2))
    else:
        click.echo(report.render_text())
        if result is not None:
            click.echo(result.render_text())
    if result is not None and not result:
        sys.exit(1)


@cli.command()
@click.argument("original", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("candidate", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON document.")
@verify_options
def verify(original: Path, candidate: Path, as_json: bool, **verify_opts) -> None:
    """Check that CANDIDATE computes what ORIGINAL computes, through onnxruntime.

    ORIGINAL runs on the CPU with every graph optimization off; CANDIDATE runs on each provider.
    Outputs are matched by name. Exit codes: 0 equivalent within tolerance, 1 not equivalent,
    2 bad input, usage, or a provider that is not available.
    """
    result = _run_verify(original, candidate, _verify_kwargs(verify_opts))
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else result.render_text())
    sys.exit(0 if result else 1)


main = cli
