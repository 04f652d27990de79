"""The ``bnfold`` command: parse, call the Python API, render. Nothing else."""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path
from typing import Dict, List, Optional

import click

from . import __version__
from .api import default_output, fold_file, inspect as inspect_model
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


class _Progress:
    """A progress bar that appears on a terminal once the work has taken ``delay`` seconds, and never
    in a pipe or a log."""

    def __init__(self, length: int, label: str, delay: float = 2.0) -> None:
        self.length, self.label, self.delay = length, label, delay
        self.done, self.bar = 0, None
        self.start = time.monotonic()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)
        return False

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is None and sys.stderr.isatty() and time.monotonic() - self.start >= self.delay:
            self.bar = click.progressbar(length=self.length, label=self.label, file=sys.stderr).__enter__()
            n = self.done
        if self.bar is not None:
            self.bar.update(n)


def _progress(length: int, label: str) -> _Progress:
    return _Progress(length, label)


def _run_verify(original, candidate, kwargs: dict):
    from .verification import verify  # imports onnxruntime: only when a command verifies

    with _progress(kwargs["samples"], "verifying") as bar:
        return verify(original, candidate, progress=lambda k: bar.update(1), **kwargs)


@click.group(cls=BnfoldGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="bnfold")
def cli() -> None:
    """Fold BatchNormalization into neighbouring layers of ONNX models, and verify the result.

    \b
    bnfold inspect model.onnx                 what would fold, and why not
    bnfold fold model.onnx --verify           write model_folded.onnx and check it
    bnfold fold *.onnx -o folded/ --jobs 2    many models into a folder
    """


def _styled(text: str) -> str:
    """Colour for people: click.echo drops the codes when the output is not a terminal."""
    out = []
    for line in text.splitlines():
        if line.startswith(("folded", "verification PASSED")) or line.endswith("  ok"):
            line = click.style(line, fg="green")
        elif line.startswith("left alone") or line.startswith("  stays"):
            line = click.style(line, fg="yellow")
        elif "FAIL" in line:
            line = click.style(line, fg="red", bold=True)
        out.append(line)
    return "\n".join(out)


def _fold_one(model: str, output: str, options: dict, verify_kwargs: Optional[dict]) -> dict:
    """Fold (and verify) one model; never raises for a user error: the batch goes on."""
    try:
        report = fold_file(model, output, **options)
        entry = {"input": model, "output": output, "ok": True, "fold": report.to_dict(), "text": report.render_text()}
        if verify_kwargs is not None:
            from .verification import verify

            result = verify(model, output, **verify_kwargs)
            entry.update(ok=bool(result), verify=result.to_dict())
            entry["text"] += "\n" + result.render_text()
        return entry
    except BnfoldError as exc:
        return {"input": model, "output": output, "ok": False, "error": str(exc), "exit_code": 2}
    except Exception as exc:  # a bug: reported, and the other models still fold
        return {"input": model, "output": output, "ok": False, "error": f"internal error: {exc!r}", "exit_code": 3}


def _batch(models: List[Path], outdir: Path, jobs: int, options: dict, verify_kwargs, as_json: bool, quiet: bool) -> int:
    outdir.mkdir(parents=True, exist_ok=True)
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise UserError("two input models have the same file name; they would overwrite each other in the folder")
    tasks = [(str(m), str(outdir / m.name)) for m in models]
    results: Dict[str, dict] = {}
    with _progress(len(tasks), "folding") as bar:
        if jobs > 1:
            from concurrent.futures import ProcessPoolExecutor, as_completed

            with ProcessPoolExecutor(max_workers=jobs) as pool:
                futures = {pool.submit(_fold_one, i, o, options, verify_kwargs): i for i, o in tasks}
                for future in as_completed(futures):
                    results[futures[future]] = future.result()
                    bar.update(1)
        else:
            for i, o in tasks:
                results[i] = _fold_one(i, o, options, verify_kwargs)
                bar.update(1)
    entries = [results[i] for i, _ in tasks]
    failed = [e for e in entries if not e["ok"]]
    if as_json:
        click.echo(json.dumps({"models": [{k: v for k, v in e.items() if k != "text"} for e in entries],
                               "failed": len(failed)}, indent=2))
    elif not quiet:
        click.echo(f"{'model':30} {'BN before':>9} {'BN after':>8} {'folded':>6} {'left':>5}  status")
        for e in entries:
            name = Path(e["input"]).name
            if "fold" in e:
                f = e["fold"]
                status = "ok" if e["ok"] else "verification FAILED"
                click.echo(_styled(f"{name:30} {f['before']['batchnorms']:>9} {f['after']['batchnorms']:>8} "
                                   f"{len(f['folded']):>6} {len(f['left']):>5}  {status}"))
            else:
                click.echo(_styled(f"{name:30} {'':>9} {'':>8} {'':>6} {'':>5}  FAILED: {e['error']}"))
        click.echo(f"{len(entries) - len(failed)} of {len(entries)} model(s) folded into {outdir}")
    for e in failed:
        if "error" in e:
            click.echo(f"Error: {e['input']}: {e['error']}", err=True)
    if not failed:
        return 0
    return max(e.get("exit_code", 1) for e in failed)


@cli.command(short_help="Fold BatchNormalization into the layers next to it.")
@click.argument("models", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Output file; with several MODELS (or an existing folder, or a path ending in /), a folder.")
@click.option("--dry-run", is_flag=True, help="Decide and report, write nothing.")
@click.option("--lower-standalone", is_flag=True, help="Turn BNs that can fold nowhere into Mul + Add by per-channel constants.")
@click.option("--external-data/--no-external-data", default=None,
              help="Write weights to OUT.data beside the output, or inline (default: as the input, or external over 2 GB).")
@click.option("--in-place", is_flag=True, help="Allow the output to replace MODEL (still written atomically).")
@click.option("-j", "--jobs", type=click.IntRange(min=1), default=1, show_default=True, help="Models folded in parallel (batch).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON document.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors; the exit code tells.")
@click.option("--verify", "do_verify", is_flag=True, help="Verify each folded model against its original right after folding.")
@verify_options
def fold(models, output: Optional[Path], dry_run: bool, lower_standalone: bool, external_data: Optional[bool],
         in_place: bool, jobs: int, as_json: bool, quiet: bool, do_verify: bool, **verify_opts) -> None:
    """Fold every inference BatchNormalization of MODEL that can fold without changing meaning.

    Writes MODEL_folded.onnx beside MODEL unless -o says where. With several MODELS, -o names a
    folder (created if needed) that receives each folded model under its own name. Each BN left in a
    model is reported with a reason code.

    Exit codes: 0 done (and verified, with --verify), 1 verification failed, 2 bad input or usage,
    3 internal error.
    """
    kwargs = _verify_kwargs(verify_opts) if do_verify else None
    if kwargs is not None and in_place and not dry_run:
        raise UserError("--verify needs the original: it cannot be combined with --in-place")
    options = dict(dry_run=dry_run, lower_standalone=lower_standalone, external_data=external_data, in_place=in_place)
    batch = len(models) > 1 or (output is not None and (output.is_dir() or str(output).endswith(("/", "\\"))))
    if batch:
        if output is None:
            raise UserError("several models need -o FOLDER for their outputs")
        if in_place:
            raise UserError("--in-place folds one model at a time")
        if kwargs is not None:
            check_providers_early(kwargs)
        sys.exit(_batch(list(models), output, jobs, options, kwargs, as_json, quiet))
    model = models[0]
    out_path = output or (model if in_place else default_output(model))
    report = fold_file(model, out_path, **options)
    result = None
    if kwargs is not None and not dry_run:
        result = _run_verify(model, out_path, kwargs)
    if as_json:
        doc = report.to_dict()
        if result is not None:
            doc = {"fold": doc, "verify": result.to_dict()}
        click.echo(json.dumps(doc, indent=2))
    elif not quiet:
        click.echo(_styled(report.render_text()))
        if result is not None:
            click.echo(_styled(result.render_text()))
    if result is not None and not result:
        sys.exit(1)


def check_providers_early(kwargs: dict) -> None:
    from .verification import check_providers

    check_providers(kwargs["providers"])


@cli.command(short_help="Show every BatchNormalization of a model: folds how, or stays why.")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON document.")
def inspect(model: Path, as_json: bool) -> None:
    """Show MODEL's facts and every BatchNormalization in it: its neighbours, and whether it folds
    (and how) or why not. The decisions are exactly those `bnfold fold` takes; nothing is written."""
    report = inspect_model(model)
    click.echo(report.to_json() if as_json else _styled(report.render_text()))


@cli.command(short_help="Check through onnxruntime that two models compute the same thing.")
@click.argument("original", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("candidate", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON document.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors; the exit code tells.")
@verify_options
def verify(original: Path, candidate: Path, as_json: bool, quiet: bool, **verify_opts) -> None:
    """Check that CANDIDATE computes what ORIGINAL computes, through onnxruntime.

    ORIGINAL runs on the CPU with every graph optimization off; CANDIDATE runs on each provider.
    Outputs are matched by name. Exit codes: 0 equivalent within tolerance, 1 not equivalent,
    2 bad input, usage, or a provider that is not available.
    """
    result = _run_verify(original, candidate, _verify_kwargs(verify_opts))
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    elif not quiet:
        click.echo(_styled(result.render_text()))
    sys.exit(0 if result else 1)


main = cli
