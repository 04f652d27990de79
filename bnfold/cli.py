"""The ``bnfold`` command: parse, call the Python API, render. Nothing else."""

from __future__ import annotations

import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from . import __version__
from .errors import BnfoldError, Terminated, handle_termination, os_problem
from .options import FOLD_OPTIONS, PROVIDERS, VerifyOptions
from .report import FAIL, OK, WARN, Line

# The API (onnx, numpy) is imported when a command runs, not at start-up: shell completion stays fast.


def fold_file(*args: Any, **kwargs: Any) -> Any:
    from .api import fold_file as run

    return run(*args, **kwargs)


def fold_many(*args: Any, **kwargs: Any) -> Any:
    from .api import fold_many as run

    return run(*args, **kwargs)


def inspect_model(*args: Any, **kwargs: Any) -> Any:
    from .api import inspect as run

    return run(*args, **kwargs)


def default_output(path: Path) -> Path:
    from .api import default_output as where

    return where(path)


def _complete_providers(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
    """Completes the last name of a comma-separated list."""
    from click.shell_completion import CompletionItem

    head, _, last = incomplete.rpartition(",")
    prefix = head + "," if head else ""
    return [CompletionItem(prefix + p) for p in PROVIDERS if p.startswith(last)]


def _version(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    """bnfold's version, and those of what it runs on."""
    if not value or ctx.resilient_parsing:
        return
    import platform
    from importlib import metadata

    from .runtime import conflict, installed_runtimes

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    click.echo(f"bnfold, version {__version__}")
    click.echo(
        f"python {platform.python_version()}, onnx {version('onnx')}, numpy {version('numpy')}, "
        f"click {version('click')}"
    )
    runtimes = installed_runtimes()
    click.echo(
        "onnxruntime: " + (", ".join(f"{n} {v}" for n, v in runtimes) or "not installed (pip install 'bnfold[cpu]')")
    )
    if runtimes:
        try:
            import onnxruntime

            click.echo("providers: " + ", ".join(onnxruntime.get_available_providers()))
        except ImportError as exc:
            click.echo(f"providers: onnxruntime cannot be imported ({exc})")
    problem = conflict()
    if problem:
        click.echo(f"Warning: {problem}", err=True)
    ctx.exit()


class UserError(click.ClickException):
    exit_code = 2


class InternalError(click.ClickException):
    """A bug found by a check of bnfold's own result (no traceback to show)."""

    exit_code = 3


class BnfoldGroup(click.Group):
    """User errors become one line with exit code 2; anything unexpected is a bug: exit code 3.
    Ctrl-C and SIGTERM unwind (temporary files are removed on the way) and exit 130 and 143."""

    def invoke(self, ctx: click.Context) -> Any:
        handle_termination()
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            click.echo("Interrupted: nothing half-written was left behind.", err=True)
            ctx.exit(130)
        except Terminated:
            click.echo("Terminated: nothing half-written was left behind.", err=True)
            ctx.exit(143)
        except BnfoldError as exc:
            raise UserError(str(exc)) from None
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except BrokenPipeError:
            # The reader of the output went away (`bnfold verify ... | head`; click takes any EPIPE so
            # too): stop as a process ended by SIGPIPE would, not with 1 ("not equivalent") nor as a
            # bug, and without a second error when Python flushes stdout on exit.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            ctx.exit(141)
        except OSError as exc:  # the environment (a name too long, a full disk, no permission): not a bug
            raise UserError(os_problem(exc)) from None
        except Exception:
            click.echo(traceback.format_exc(), err=True)
            click.echo(
                f"Error: internal error in bnfold {__version__}, a bug rather than a problem with your input. "
                "Please report it to the bnfold issue tracker with the traceback above and the bnfold version.",
                err=True,
            )
            ctx.exit(3)


def _pairs(values: Sequence[str], what: str) -> dict[str, str]:
    out = {}
    for v in values:
        name, sep, rest = v.rpartition("=")
        if not sep or not name or not rest:
            raise click.BadParameter(f"expected NAME=VALUE, got '{v}'", param_hint=what)
        out[name] = rest
    return out


def _verify_options(o: dict[str, Any]) -> VerifyOptions:
    try:
        dims = {k: int(v) for k, v in _pairs(o["dim"], "--dim").items()}
        shapes = {k: [int(d) for d in v.split(",")] for k, v in _pairs(o["input_shape"], "--input-shape").items()}
    except ValueError:
        raise click.BadParameter("sizes must be integers", param_hint="--dim/--input-shape") from None
    return VerifyOptions(
        providers=tuple(p for p in o["providers"].split(",") if p.strip()),
        rtol=o["rtol"],
        atol=o["atol"],
        samples=o["samples"],
        seed=o["seed"],
        dims=dims,
        input_shapes=shapes,
        inputs=tuple(o["inputs"]) or None,
        max_input_bytes=o["max_input_bytes"],
        baseline=o["baseline"],
        save_inputs=o["save_inputs"],
        save_outputs=o["save_outputs"],
        per_layer=o["per_layer"],
        graph_optimization=o["graph_optimization"],
        allow_tf32=o["allow_tf32"],
    )


_DEFAULTS = VerifyOptions()
AFFINE = click.option(
    "--affine/--no-affine",
    default=True,
    show_default=True,
    help="Also fold per-channel Mul/Add/Sub/Div by constants that follow a layer, without a BN.",
)
REPARAMETERIZE = click.option(
    "--reparameterize/--no-reparameterize",
    default=True,
    show_default=True,
    help="Fold the identity-branch BN of RepVGG/MobileOne blocks into a sibling Conv, where exact.",
)
STRICT = click.option(
    "--strict", is_flag=True, help="Refuse every fold with a hazard (the BN stays, the hazard its reason)."
)
VERIFY_OPTIONS = [
    click.option(
        "--providers",
        default=",".join(_DEFAULTS.providers),
        show_default=True,
        shell_complete=_complete_providers,
        help="Comma-separated: cpu, cuda.",
    ),
    click.option(
        "--rtol",
        type=float,
        default=None,
        help="Judge elementwise with this relative tolerance (instead of the scaled error).",
    ),
    click.option(
        "--atol",
        type=float,
        default=None,
        help="Judge elementwise with this absolute tolerance (instead of the scaled error).",
    ),
    click.option(
        "--baseline/--no-baseline",
        default=_DEFAULTS.baseline,
        show_default=True,
        help="Also run onnxruntime's own BN fusion of the original: the noise floor the bound adapts to.",
    ),
    click.option("--save-inputs", type=click.Path(), default=None, help="Write the inputs used (.npz)."),
    click.option("--save-outputs", type=click.Path(), default=None, help="Write every output compared (.npz)."),
    click.option(
        "--samples",
        type=click.IntRange(min=1),
        default=_DEFAULTS.samples,
        show_default=True,
        help="Random input samples to compare.",
    ),
    click.option("--seed", type=int, default=_DEFAULTS.seed, show_default=True, help="Seed of the random inputs."),
    click.option(
        "--dim", multiple=True, metavar="NAME=SIZE", help="Size of a named dynamic dimension (default 1). Repeatable."
    ),
    click.option("--input-shape", multiple=True, metavar="NAME=D1,D2,...", help="Full shape of one input. Repeatable."),
    click.option(
        "--inputs",
        type=click.Path(dir_okay=False),
        multiple=True,
        help="Use these arrays (.npz keyed by input name; a leading axis holds several samples). Repeatable.",
    ),
    click.option(
        "--max-input-bytes",
        type=click.IntRange(min=1),
        default=_DEFAULTS.max_input_bytes,
        show_default=True,
        help="Refuse inputs larger than this (one synthesized sample, or all --inputs arrays).",
    ),
    click.option(
        "--per-layer", is_flag=True, help="Also compare every BatchNormalization output; name the first that diverges."
    ),
    click.option(
        "--graph-optimization",
        type=click.Choice(["disable", "basic", "extended", "all"]),
        default="disable",
        show_default=True,
        help="onnxruntime optimization level for the candidate (the reference always runs with none).",
    ),
    click.option("--allow-tf32", is_flag=True, help="On CUDA, allow TF32 math (tolerances widened to match)."),
]


def verify_options(f: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(VERIFY_OPTIONS):
        f = option(f)
    return f


class _Progress:
    """A progress bar that appears on a terminal once the work has taken ``delay`` seconds, and never
    in a pipe or a log."""

    def __init__(self, length: int, label: str, delay: float = 2.0) -> None:
        self.length, self.label, self.delay = length, label, delay
        self.done = 0
        self.bar: Any = None
        self.start = time.monotonic()

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def update(self, n: int, item: str | None = None) -> None:
        self.done += n
        if self.bar is None and sys.stderr.isatty() and time.monotonic() - self.start >= self.delay:
            self.bar = click.progressbar(
                length=self.length, label=self.label, file=sys.stderr, item_show_func=lambda x: x
            ).__enter__()
            n = self.done
        if self.bar is not None:
            self.bar.update(n, item)


def _progress(length: int, label: str) -> _Progress:
    return _Progress(length, label)


def _run_verify(original: Path, candidate: Path, options: VerifyOptions) -> Any:
    from .verification import verify  # imports onnxruntime: only when a command verifies

    with _progress(options.samples, "verifying") as bar:
        return verify(original, candidate, options, progress=lambda k: bar.update(1))


@click.group(cls=BnfoldGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_version,
    help="Show the versions of bnfold, onnx, onnxruntime (and its providers), numpy; then exit.",
)
def cli() -> None:
    """Fold BatchNormalization into neighbouring layers of ONNX models, and verify the result.

    \b
    bnfold inspect model.onnx                 what would fold, and why not
    bnfold fold model.onnx --verify           write model_folded.onnx and check it
    bnfold fold *.onnx -o folded/ --jobs 2    many models into a folder
    """


STYLES: dict[str, dict[str, Any]] = {OK: {"fg": "green"}, WARN: {"fg": "yellow"}, FAIL: {"fg": "red", "bold": True}}


def _echo(lines: list[Line], err: bool = False) -> None:
    """Print lines of styled spans: coloured on a terminal (click drops colours elsewhere), never
    when NO_COLOR is set."""
    colour = not os.environ.get("NO_COLOR")
    for line in lines:
        click.echo(
            "".join(click.style(text, **STYLES[style]) if colour and style in STYLES else text for text, style in line),
            err=err,
        )


def _dump(doc: Any) -> None:
    import json

    click.echo(json.dumps(doc, indent=2))


def _batch(
    models: list[Path],
    outdir: Path,
    jobs: int,
    options: dict[str, Any],
    verify: VerifyOptions | None,
    keep_failed: bool,
    as_json: bool,
    quiet: bool,
) -> int:
    with _progress(len(models), "folding") as bar:
        report = fold_many(
            models,
            outdir,
            jobs=jobs,
            verify=verify,
            keep_failed=keep_failed,
            progress=lambda name: bar.update(1, name),
            **options,
        )
    if as_json:
        click.echo(report.to_json())
    elif not quiet:
        _echo(report.render_lines())
    for e in report.entries:
        if e.error is not None:  # the message names the file already when it is about the file
            click.echo(f"Error: {e.error if e.input in e.error else e.input + ': ' + e.error}", err=True)
    code: int = report.exit_code
    return code


@cli.command(short_help="Fold BatchNormalization into the layers next to it.")
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    default=None,
    help="Output file; with several MODELS (or an existing folder, or a path ending in /), a folder.",
)
@click.option("--dry-run", is_flag=True, help="Decide and report, write nothing.")
@click.option(
    "--lower-standalone", is_flag=True, help="Turn BNs that can fold nowhere into Mul + Add by per-channel constants."
)
@click.option(
    "--external-data/--no-external-data",
    default=None,
    help="Write weights to OUT.data beside the output, or inline (default: as the input, or external over 2 GB).",
)
@click.option("--in-place", is_flag=True, help="Allow the output to replace MODEL (still written atomically).")
@STRICT
@AFFINE
@REPARAMETERIZE
@click.option(
    "--check",
    is_flag=True,
    help="Run onnx.checker (full_check) on the input and the output, and report both (costs about a "
    "quarter of a fold).",
)
@click.option(
    "-j", "--jobs", type=click.IntRange(min=1), default=1, show_default=True, help="Models folded in parallel (batch)."
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON document.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors; the exit code tells.")
@click.option(
    "--verify", "do_verify", is_flag=True, help="Verify each folded model against its original right after folding."
)
@click.option(
    "--keep-failed/--remove-failed",
    default=True,
    show_default=True,
    help="With --verify: keep or remove an output that fails verification.",
)
@verify_options
@click.pass_context
def fold(
    ctx: click.Context,
    /,
    models: list[Path],
    output: Path | None,
    dry_run: bool,
    lower_standalone: bool,
    external_data: bool | None,
    in_place: bool,
    strict: bool,
    affine: bool,
    reparameterize: bool,
    check: bool,
    jobs: int,
    as_json: bool,
    quiet: bool,
    do_verify: bool,
    keep_failed: bool,
    **verify_opts: Any,
) -> None:
    """Fold every inference BatchNormalization of MODEL that can fold without changing meaning.

    Writes MODEL_folded.onnx beside MODEL unless -o says where. With several MODELS, -o names a
    folder (created if needed) that receives each folded model under its own name. Each BN left in a
    model is reported with a reason code.

    Exit codes: 0 done (and verified, with --verify), 1 verification failed, 2 bad input or usage,
    3 internal error.
    """
    params = dict(locals())  # the fold options among them go to the API as they are
    given = [
        k
        for k in [*verify_opts, "keep_failed"]
        if ctx.get_parameter_source(k) not in (click.core.ParameterSource.DEFAULT, None)
    ]
    if given and not do_verify:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise UserError(f"{flags} only applies with --verify")
    verify = _verify_options(verify_opts) if do_verify and not dry_run else None
    if verify is not None:
        if in_place:
            raise UserError("--verify needs the original: it cannot be combined with --in-place")
        _check_providers(verify)  # before anything is written
    options: dict[str, Any] = {name: value for name, value in params.items() if name in FOLD_OPTIONS}
    batch = len(models) > 1 or (output is not None and (output.is_dir() or str(output).endswith(("/", "\\"))))
    if batch:
        if output is None:
            raise UserError("several models need -o FOLDER for their outputs")
        if output.exists() and not output.is_dir():
            raise UserError(f"-o {output}: several models need a folder, and this is a file")
        if in_place:
            raise UserError("--in-place folds one model at a time")
        sys.exit(_batch(list(models), output, jobs, options, verify, keep_failed, as_json, quiet))
    model = models[0]
    out_path = output or (model if in_place else default_output(model))
    if verify is not None:
        _check_save_paths(verify, model, out_path)  # before anything is written
    report = fold_file(model, out_path, in_place=in_place, **options)
    result = None
    if verify is not None:
        result = _run_verify(model, out_path, verify)
        if not result and not keep_failed:
            from .api import remove_output

            remove_output(out_path)
    if as_json:
        _dump(report.to_dict() if result is None else {"fold": report.to_dict(), "verify": result.to_dict()})
    elif not quiet:
        _echo(report.render_lines())
        if result is not None:
            _echo(result.render_lines())
    if report.checker_regressed:
        raise InternalError("the folded model fails onnx.checker where the input passed: a bug in bnfold")
    if result is not None and not result:
        sys.exit(1)


def _check_save_paths(options: VerifyOptions, model: Path, output: Path) -> None:
    from .verification import check_save_paths

    out = output.resolve()
    check_save_paths(
        options, {model.resolve(), out, out.with_name(out.name + ".data"), out.with_name(out.name + ".1.data")}
    )


def _check_providers(options: VerifyOptions) -> None:
    from .verification import check_providers

    check_providers(options.providers)


@cli.command(short_help="Show every BatchNormalization of a model: folds how, or stays why.")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON document.")
@STRICT
@AFFINE
@REPARAMETERIZE
@click.option("--lower-standalone", is_flag=True, help="Decide as fold --lower-standalone would.")
def inspect(
    model: Path, as_json: bool, strict: bool, affine: bool, reparameterize: bool, lower_standalone: bool
) -> None:
    """Show MODEL's facts and every BatchNormalization in it: its neighbours, and whether it folds
    (and how) or why not, and the hazards of the folds. The decisions are exactly those `bnfold fold`
    takes with the same options; nothing is written."""
    report = inspect_model(
        model, strict=strict, lower_standalone=lower_standalone, affine=affine, reparameterize=reparameterize
    )
    if as_json:
        click.echo(report.to_json())
    else:
        _echo(report.render_lines())


@cli.command(short_help="Check through onnxruntime that two models compute the same thing.")
@click.argument("original", type=click.Path(path_type=Path))
@click.argument("candidate", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON document.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors; the exit code tells.")
@verify_options
def verify(original: Path, candidate: Path, as_json: bool, quiet: bool, **verify_opts: Any) -> None:
    """Check that CANDIDATE computes what ORIGINAL computes, through onnxruntime.

    ORIGINAL runs on the CPU with every graph optimization off; CANDIDATE runs on each provider.
    Outputs are matched by name. Exit codes: 0 equivalent within tolerance, 1 not equivalent,
    2 bad input, usage, or a provider that is not available.
    """
    result = _run_verify(original, candidate, _verify_options(verify_opts))
    if as_json:
        click.echo(result.to_json())
    elif not quiet:
        _echo(result.render_lines())
    sys.exit(0 if result else 1)


def _exit_code(args: Sequence[str] | None, prog_name: str | None) -> int:
    """Run the command as click's standalone mode would, but return its exit code."""
    try:
        rv = cli.main(args=args, prog_name=prog_name, standalone_mode=False)
    except click.exceptions.Abort:  # an interrupt outside the command itself (click's own work)
        click.echo("Interrupted: nothing half-written was left behind.", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BrokenPipeError:  # help or usage printed into a closed pipe: as BnfoldGroup.invoke does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return rv if isinstance(rv, int) else 0


def main(args: Sequence[str] | None = None, prog_name: str | None = None) -> None:
    """The console entry point. Once the command's outcome is decided (its output complete, or its
    failure reported), SIGINT and SIGTERM are ignored: a signal arriving then cannot kill the
    process by the signal and hide the exit code. One arriving just before is exit 130 or 143."""
    try:
        try:
            code = _exit_code(args, prog_name)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    signal.signal(sig, signal.SIG_IGN)
                except ValueError:  # not the main thread
                    pass
    except KeyboardInterrupt:
        code = 130
    except Terminated:
        code = 143
    sys.exit(code)
