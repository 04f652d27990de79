"""The ``bnfold`` command: parse, call the Python API, render. Nothing else."""

from __future__ import annotations

import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import MISSING, Field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from click.core import ParameterSource

from . import __version__, terminal
from .errors import BnfoldError, OptionError, Terminated, handle_termination, os_problem
from .options import PROVIDERS, FoldOptions, Options, VerifyOptions, flag_of
from .report import FAIL, OK, WARN, Line

if TYPE_CHECKING:  # the API's types; the modules themselves are imported when a command runs
    from .report import BatchReport, FoldReport, InspectReport, VerifyReport

# The API (onnx, numpy) is imported when a command runs, not at start-up: shell completion stays fast.


def fold_file(model: Path, output: Path, options: FoldOptions) -> FoldReport:
    from .api import fold_file as run

    return run(model, output, options)


def fold_many(
    models: list[Path],
    outdir: Path,
    options: FoldOptions,
    verify: VerifyOptions | None,
    keep_failed: bool,
    jobs: int,
    progress: Callable[[str], None],
) -> BatchReport:
    from .api import fold_many as run

    return run(models, outdir, options, jobs=jobs, verify=verify, keep_failed=keep_failed, progress=progress)


def inspect_model(model: Path, options: FoldOptions) -> InspectReport:
    from .api import inspect as run

    return run(model, options)


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
        except OptionError as exc:  # the API names its parameter; here the flag that sets it
            raise UserError(exc.named(cli_flag(exc.option))) from None
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


def _sizes(values: Sequence[str], flag: str, parse: Callable[[str], Any]) -> dict[str, Any]:
    try:
        return {k: parse(v) for k, v in _pairs(values, flag).items()}
    except ValueError:
        raise click.BadParameter("sizes must be integers", param_hint=flag) from None


# What the command line gives for a field, as the field takes it (the others are taken as they come).
FROM_CLI: dict[str, Callable[[Any], Any]] = {
    "dims": lambda v: _sizes(v, "--dim", int),
    "input_shapes": lambda v: _sizes(v, "--input-shape", lambda d: [int(x) for x in d.split(",")]),
    "inputs": lambda v: tuple(v) or None,
}
KINDS: dict[str, Any] = {
    "int": int,
    "float": float,
    "str": str,
    "path": click.Path(),
    "file": click.Path(dir_okay=False),
}


def _flag(f: Field[Any], help: str | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The click option of an options field, from its declaration (bnfold.options.option)."""
    spec = dict(f.metadata["cli"])
    default = f.default_factory() if f.default_factory is not MISSING else f.default
    kw: dict[str, Any] = {"help": help or f.metadata["help"]}
    kind, choices = spec.get("kind"), spec.get("choices")
    if spec.get("multiple"):
        kw.update(multiple=True, metavar=spec.get("metavar"), type=KINDS.get(kind or "str"))
    elif kind is None and choices is None:  # a boolean: a flag, or a --x/--no-x pair
        kw.update({"default": default, "show_default": True} if "/" in spec.get("flag", "") else {"is_flag": True})
    else:
        if choices:
            kw["type"] = click.Choice(choices)
        else:
            kw["type"] = click.IntRange(min=spec["min"]) if "min" in spec else KINDS[str(kind)]
        kw["default"] = spec.get("default_text", default)
        kw["show_default"] = default is not None
    if spec.get("complete") == "providers":
        kw["shell_complete"] = _complete_providers
    return click.option(spec.get("flag") or flag_of(f), f.name, **kw)


def options_of(cls: type[Any], *names: str, **helps: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a command with the flags of ``cls``'s fields (``names``, or all), in order; ``helps``
    replaces a field's help text where a command means it differently."""
    by_name = {f.name: f for f in fields(cls)}
    chosen = [by_name[name] for name in names] if names else list(by_name.values())

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        for f in reversed(chosen):
            command = _flag(f, helps.get(f.name))(command)
        return command

    return decorate


def _take(cls: type[Options], values: dict[str, Any]) -> Options:
    """The options ``cls`` given on the command line: its fields are taken out of ``values``."""
    given = {f.name: values.pop(f.name) for f in fields(cls) if f.name in values}
    return cls(**{name: FROM_CLI.get(name, lambda v: v)(value) for name, value in given.items()})


def cli_flag(option: str) -> str:
    """The flag that sets an API option (a field of FoldOptions or VerifyOptions)."""
    for cls in (FoldOptions, VerifyOptions):
        for f in fields(cls):
            if f.name == option:
                return flag_of(f)
    return "--" + option.replace("_", "-")


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
            columns = terminal.width(sys.stderr) or 80
            bar_width = max(8, min(36, columns - len(self.label) - 40))  # label, bar, counts, name: one line
            self.bar = click.progressbar(
                length=self.length,
                label=self.label,
                file=sys.stderr,
                width=bar_width,
                item_show_func=lambda x: terminal.elide(x, 20) if x else x,
            ).__enter__()
            n = self.done
        if self.bar is not None:
            self.bar.update(n, item)


def _progress(length: int, label: str) -> _Progress:
    return _Progress(length, label)


def _run_verify(original: Path, candidate: Path, options: VerifyOptions) -> VerifyReport:
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
    when NO_COLOR is set; fitted to the terminal's width (a line too long is wrapped at spaces in its
    first span's style, a name too long elided in the middle)."""
    colour = not os.environ.get("NO_COLOR")
    columns = terminal.width(sys.stderr if err else sys.stdout)
    for line in lines:
        text = "".join(t for t, _ in line)
        rows = [line]
        if columns is not None and len(text) > columns:
            style = line[0][1] if line else ""
            rows = [[(part, style)] for part in terminal.fit(text, columns)]
        for row in rows:
            click.echo("".join(click.style(t, **STYLES[s]) if colour and s in STYLES else t for t, s in row), err=err)


def _json_or_quiet(as_json: bool, quiet: bool) -> None:
    if as_json and quiet:
        raise UserError("--json prints the report and -q/--quiet prints nothing: choose one")


def _dump(doc: Any) -> None:
    import json

    click.echo(json.dumps(doc, indent=2))


def _batch(
    models: list[Path],
    outdir: Path,
    options: FoldOptions,
    verify: VerifyOptions | None,
    keep_failed: bool,
    jobs: int,
    as_json: bool,
    quiet: bool,
) -> int:
    if options.in_place:
        raise UserError("--in-place folds one model at a time")
    with _progress(len(models), "folding") as bar:
        report = fold_many(models, outdir, options, verify, keep_failed, jobs, lambda name: bar.update(1, name))
    if as_json:
        click.echo(report.to_json())
    elif not quiet:
        _echo(report.render_lines())
    for e in report.entries:
        if e.error is not None:  # the message names the file already when it is about the file
            click.echo(f"Error: {e.error if e.input in e.error else e.input + ': ' + e.error}", err=True)
    code: int = report.exit_code
    return code


def _verification(
    ctx: click.Context, values: dict[str, Any], do_verify: bool, fold: FoldOptions
) -> VerifyOptions | None:
    """The verification fold --verify asks for (None without it: its flags are then refused)."""
    given = [
        f for f in fields(VerifyOptions) if ctx.get_parameter_source(f.name) not in (ParameterSource.DEFAULT, None)
    ]
    keep = ctx.get_parameter_source("keep_failed") not in (ParameterSource.DEFAULT, None)
    if (given or keep) and not do_verify:
        flags = ", ".join([flag_of(f) for f in given] + (["--keep-failed/--remove-failed"] if keep else []))
        raise UserError(f"{flags} only applies with --verify")
    verify = _take(VerifyOptions, values)
    if not do_verify:
        return None
    if fold.dry_run:
        raise UserError("--verify compares the written model with its original, and --dry-run writes none: drop one")
    if fold.in_place:
        raise UserError("--verify needs the original: it cannot be combined with --in-place")
    _check_providers(verify)  # before anything is written
    return verify


def _fold_and_verify(
    model: Path, output: Path | None, options: FoldOptions, verify: VerifyOptions | None, keep_failed: bool
) -> tuple[FoldReport, VerifyReport | None]:
    out_path = output or (model if options.in_place else default_output(model))
    if verify is not None:
        _check_save_paths(verify, model, out_path)  # before anything is written
    report = fold_file(model, out_path, options)
    result = None
    if verify is not None:
        try:
            result = _run_verify(model, out_path, verify)
        except BnfoldError as exc:  # the fold's output stays; say so
            raise UserError(f"{exc}; the folded model was written to {out_path}, not verified") from None
        if not result and not keep_failed:
            from .api import remove_output

            remove_output(out_path)
    return report, result


class FoldCommand(click.Command):
    """fold's --help with its options in groups: what is folded, where it goes, how it is verified."""

    OUTPUT = ("output", "external_data", "in_place", "dry_run", "jobs", "as_json", "quiet")
    VERIFY = ("do_verify", "keep_failed")

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        verify_fields = {f.name for f in fields(VerifyOptions)} | set(self.VERIFY)
        groups: dict[str, list[tuple[str, str]]] = {
            "Fold options": [],
            "Output options": [],
            "Verification options": [],
        }
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx) if isinstance(param, click.Option) else None
            if record is None:
                continue
            if param.name in verify_fields:
                groups["Verification options"].append(record)
            elif param.name in self.OUTPUT or param is self.get_help_option(ctx):
                groups["Output options"].append(record)
            else:
                groups["Fold options"].append(record)
        for title, records in groups.items():
            with formatter.section(title):
                formatter.write_dl(records)


@cli.command(cls=FoldCommand, short_help="Fold BatchNormalization into the layers next to it.")
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    default=None,
    help="Output file; with several MODELS (or an existing folder, or a path ending in /), a folder.",
)
@options_of(FoldOptions)
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
@options_of(VerifyOptions)
@click.pass_context
def fold(
    ctx: click.Context,
    /,
    models: list[Path],
    output: Path | None,
    jobs: int,
    as_json: bool,
    quiet: bool,
    do_verify: bool,
    keep_failed: bool,
    **values: Any,
) -> None:
    """Fold every inference BatchNormalization of MODELS that can fold without changing meaning.

    Writes MODEL_folded.onnx beside each MODEL unless -o says where; with several MODELS, -o names a
    folder (created if needed). Each BN left is reported with a reason code.

    Exit codes: 0 done (and verified, with --verify), 1 verification failed, 2 bad input or usage,
    3 internal error.
    """
    _json_or_quiet(as_json, quiet)
    options = _take(FoldOptions, values)
    verify = _verification(ctx, values, do_verify, options)
    batch = len(models) > 1 or (output is not None and (output.is_dir() or str(output).endswith(("/", "\\"))))
    if batch:
        if output is None:
            raise UserError("several models need -o FOLDER for their outputs")
        if output.exists() and not output.is_dir():
            raise UserError(f"-o {output}: several models need a folder, and this is a file")
        sys.exit(_batch(list(models), output, options, verify, keep_failed, jobs, as_json, quiet))
    report, result = _fold_and_verify(models[0], output, options, verify, keep_failed)
    if as_json:
        _dump({**report.to_dict(), "verify": None if result is None else result.to_dict()})  # one shape
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
@options_of(
    FoldOptions,
    "strict",
    "affine",
    "reparameterize",
    "lower_standalone",
    lower_standalone="Decide as fold --lower-standalone would.",
)
def inspect(model: Path, as_json: bool, **values: Any) -> None:
    """Show MODEL's facts and every BatchNormalization in it: its neighbours, and whether it folds
    (and how) or why not, and the hazards of the folds. The decisions are exactly those `bnfold fold`
    takes with the same options; nothing is written."""
    report = inspect_model(model, _take(FoldOptions, values))
    if as_json:
        click.echo(report.to_json())
    else:
        _echo(report.render_lines())


@cli.command(short_help="Check through onnxruntime that two models compute the same thing.")
@click.argument("original", type=click.Path(path_type=Path))
@click.argument("candidate", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON document.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors; the exit code tells.")
@options_of(VerifyOptions)
def verify(original: Path, candidate: Path, as_json: bool, quiet: bool, **values: Any) -> None:
    """Check that CANDIDATE computes what ORIGINAL computes, through onnxruntime.

    ORIGINAL runs on the CPU with every graph optimization off; CANDIDATE runs on each provider.
    Outputs are matched by name. Exit codes: 0 equivalent within tolerance, 1 not equivalent,
    2 bad input, usage, or a provider that is not available.
    """
    _json_or_quiet(as_json, quiet)
    result = _run_verify(original, candidate, _take(VerifyOptions, values))
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
