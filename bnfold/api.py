"""The Python API: what the CLI calls, usable on its own."""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import onnx

from .errors import (
    BnfoldError,
    OptionError,
    Terminated,
    enough_memory,
    handle_termination,
    model_text,
    os_problem,
    quiet_numpy,
)
from .fold import FoldPlan, apply, plan_model, stats
from .io.load import ModelLike, check_model, checker_problem, file_size, open_model
from .io.save import save
from .io.tensors import Source
from .options import FoldOptions, PathLike, VerifyOptions
from .proto import all_nodes, external_location, initializers, is_batchnorm, tensor_nbytes
from .report import BatchEntry, BatchNormInfo, BatchReport, FoldReport, InspectReport, ModelStats


def _open(model: ModelLike) -> tuple[onnx.ModelProto, Path | None, Source]:
    if isinstance(model, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        check_model(copy, "<model>")
        return copy, None, Source(None)
    path = Path(model)
    proto, source = open_model(path)
    return proto, path, source


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Plan and apply make and drop many small objects, all freed by reference counting; on a
    large graph the cyclic collector's passes over every live object (each node and tensor of the
    model) took a fifth of the fold. It is paused for them, and resumes after as it was. What was
    made meanwhile joins the oldest generation unscanned (gc.freeze, then gc.unfreeze): resuming
    with every one of those objects in the youngest generation cost a full pass over them at the
    next allocation (0.2 s on a 100k-node graph). Not when the process keeps objects frozen
    (unfreezing would release them too): Python 3.12 starts with some, so there it is skipped."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            if not gc.get_freeze_count():
                gc.freeze()
                gc.unfreeze()
            gc.enable()


def default_output(path: Path) -> Path:
    return path.with_name(f"{path.stem}_folded{path.suffix or '.onnx'}")


def _check_output(output: Path, path: Path | None, source: Source, in_place: bool) -> None:
    if path is None or in_place:
        return
    out = Path(output).resolve()
    protected = {path.resolve()} | source.files()
    if {out, out.with_name(out.name + ".data"), out.with_name(out.name + ".1.data")} & protected:
        raise BnfoldError(
            f"{output}: writing there would overwrite the input model or its external data; "
            "choose another output path (or in_place, --in-place, to replace the input)"
        )


def _dry_run_result(proto: onnx.ModelProto, source: Source, plan: FoldPlan) -> ModelStats:
    """The counts the fold would give, from the plan applied to a copy (the model stays as it was)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    with quiet_numpy(), _collector_paused():
        apply(copy, plan, source)
    return stats(copy, _size(copy))


def _size(model: onnx.ModelProto) -> int:
    """The bytes a model would take written: its protobuf, and the bytes of the tensors whose values
    are not in it (file-backed, or computed when written)."""
    size: int = model.ByteSize()
    return size + sum(tensor_nbytes(t) for t in initializers(model) if t.data_location == onnx.TensorProto.EXTERNAL)


def _plan(proto: onnx.ModelProto, source: Source, o: FoldOptions, apply_it: bool) -> FoldPlan:
    """Plan (and with ``apply_it``, apply) with numpy quiet and the collector paused."""
    with quiet_numpy(), _collector_paused():
        plan = plan_model(proto, source, o)
        if apply_it:
            apply(proto, plan, source)
    return plan


def _report(plan: FoldPlan, before: ModelStats, after: ModelStats, path: Path | None, dry_run: bool) -> FoldReport:
    return FoldReport(
        before=before,
        after=after,
        folded=list(plan.folded),
        left=list(plan.left),
        absorbed=list(plan.absorbed),
        input=str(path) if path is not None else None,
        dry_run=dry_run,
        warnings=[h.to_dict() for h in plan.warnings],
        affine=list(plan.affine),
    )


@model_text()
@enough_memory("to fold this model", "close other programs, or fold on a machine with more memory")
def _fold(
    model: ModelLike, output: PathLike | None, o: FoldOptions, in_memory: bool = False
) -> tuple[onnx.ModelProto, FoldReport, Source]:
    """Open, plan, apply, save. ``in_memory`` gives the result its weights before it is written, so
    that what is returned is what was written even when the output replaces the input."""
    proto, path, source = _open(model)
    if output is not None:
        _check_output(Path(output), path, source, o.in_place)
    before = stats(proto, file_size(path, source) if path is not None else None)
    plan = _plan(proto, source, o, not o.dry_run)
    if in_memory and not o.dry_run:
        source.materialize(proto)
    report = _report(
        plan, before, _dry_run_result(proto, source, plan) if o.dry_run else stats(proto, 0), path, o.dry_run
    )
    checked: dict[str, str | None] = {}
    if o.check:
        checked["input"] = checker_problem(path if path is not None else cast(onnx.ModelProto, model))
        report.checker = checked
    if output is not None and not o.dry_run:
        report.after.bytes = save(proto, output, source=source, external=o.external_data)
        report.output = str(output)
        if o.check:
            checked["output"] = checker_problem(Path(output))
    elif o.check and not o.dry_run and in_memory:
        checked["output"] = checker_problem(proto)
    return proto, report, source


def fold(
    model: ModelLike, output: PathLike | None = None, options: FoldOptions | None = None, **overrides: Any
) -> tuple[onnx.ModelProto, FoldReport]:
    """Fold every inference BatchNormalization of ``model`` that can fold without changing meaning.

    ``model`` is a path or an ``onnx.ModelProto`` (never modified: the fold works on a copy). With
    ``output``, the folded model is also written there atomically. ``options`` is a
    :class:`FoldOptions` (default: its defaults); keyword arguments named as its fields
    (``strict=True``, ``external_data=False``, ...) override it. Returns the folded model, with its
    weights in memory (or in the external data file it was written with), and a
    :class:`FoldReport` naming each folded BN and giving a reason for each BN left alone.
    For large models, :func:`fold_file` does the same without holding the weights in memory.
    """
    o = FoldOptions.of(options, **overrides)
    proto, report, _source = _fold(model, output, o, in_memory=True)
    if output is None and not o.dry_run:
        report.after.bytes = proto.ByteSize() + sum(
            int(loc.get("length", 0) or 0) for t in initializers(proto) if (loc := external_location(t))
        )
    return proto, report


def fold_file(
    model: PathLike, output: PathLike | None = None, options: FoldOptions | None = None, **overrides: Any
) -> FoldReport:
    """Fold the model file ``model`` into ``output`` (default: ``MODEL_folded.onnx`` beside it, or
    ``model`` itself with ``in_place``), streaming: weights are read from their files only where
    they change, and written one at a time. Options as for :func:`fold`. Returns the
    :class:`FoldReport`."""
    o = FoldOptions.of(options, **overrides)
    path = Path(model)
    if output is None:
        output = path if o.in_place else default_output(path)
    return _fold(path, None if o.dry_run else output, o)[1]


def _op_types(model: onnx.ModelProto) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Producer op type of each value, and the op types reading it, over every graph and function."""
    producers: dict[str, str] = {}
    readers: dict[str, list[str]] = {}
    for node in all_nodes(model):
        for o in node.output:
            producers[o] = node.op_type
        for i in node.input:
            readers.setdefault(i, []).append(node.op_type)
    return producers, readers


@model_text()
def inspect(model: ModelLike, options: FoldOptions | None = None, **overrides: Any) -> InspectReport:
    """Facts about ``model`` and every BatchNormalization in it: its neighbours, and whether it
    folds (and how) or why not, and the hazards of the folds: the decisions :func:`fold` would take
    with the same options (a :class:`FoldOptions`, or keywords named as its fields), nothing written."""
    o = FoldOptions.of(options, **overrides)
    proto, path, source = _open(model)
    producers, readers = _op_types(proto)
    plan = _plan(proto, source, o, False)
    infos = []
    for f in plan.folded:
        infos.append(BatchNormInfo(f.name, f.output, None, [], True, None, "", f"{f.into_op} {f.into}", f.direction))
    for item in plan.left:
        infos.append(BatchNormInfo(item.name, item.output, None, [], False, item.reason, item.message))
    bn_inputs = {
        node.output[0]: node.input[0] for node in all_nodes(proto) if is_batchnorm(node) and node.output and node.input
    }
    for info in infos:
        info.producer = producers.get(bn_inputs.get(info.output, ""))
        info.consumers = sorted(set(readers.get(info.output, [])))
    order = {name: k for k, name in enumerate(bn_inputs)}
    infos.sort(key=lambda b: order.get(b.output, len(order)))
    counts = stats(proto, file_size(path, source) if path is not None else None)
    return InspectReport(
        path=str(path) if path is not None else None,
        ir_version=proto.ir_version,
        opsets={o.domain: o.version for o in proto.opset_import},
        producer=" ".join(x for x in (proto.producer_name, proto.producer_version) if x),
        bytes=counts.bytes,
        external_data=sorted(str(p.name) for p in source.files() if path is None or p != path.resolve())
        if path is not None
        else [],
        nodes=counts.nodes,
        initializers=counts.initializers,
        batchnorms=infos,
        warnings=[h.to_dict() for h in plan.warnings],
    )


def _fold_one(
    model: str, output: str, options: FoldOptions, verify: VerifyOptions | None, keep_failed: bool
) -> BatchEntry:
    """Fold (and verify) one model of a batch; never raises for a user error: the batch goes on."""
    entry = BatchEntry(model, output)
    try:
        entry.fold = fold_file(model, output, options)
        if entry.fold.checker_regressed:
            entry.error, entry.exit_code = (
                "internal error: the folded model fails onnx.checker where the input passed",
                3,
            )
            return entry
        if verify is not None and not options.dry_run:
            from .verification import verify as run_verify

            entry.verify = run_verify(model, output, _for_model(verify, model))
            if not entry.verify.passed:
                entry.exit_code = 1
                if not keep_failed:
                    remove_output(Path(output))
                    entry.removed = True
    except BnfoldError as exc:
        entry.error, entry.exit_code = str(exc), 2
    except OSError as exc:  # the environment, not a bug: the batch goes on
        entry.error, entry.exit_code = os_problem(exc), 2
    except Exception as exc:  # a bug: reported, and the other models still fold
        entry.error, entry.exit_code = f"internal error: {exc!r}", 3
    return entry


def _for_model(options: VerifyOptions, model: str) -> VerifyOptions:
    """A batch gives one --dim/--input-shape for models whose inputs differ: each model gets those
    it has (a single verification is strict and refuses names the model lacks)."""
    if not options.dims and not options.input_shapes:
        return options
    from dataclasses import replace

    from .verification.inputs import input_specs

    specs = input_specs(open_model(model)[0])
    dynamic = {d for _, _, dims in specs for d in dims if isinstance(d, str)}
    names = {n for n, _, _ in specs}
    return replace(
        options,
        dims={k: v for k, v in options.dims.items() if k in dynamic},
        input_shapes={k: v for k, v in options.input_shapes.items() if k in names},
    )


def remove_output(path: Path) -> None:
    """Remove a written model and the data file written beside it."""
    for p in (path, path.with_name(path.name + ".data")):
        if p.exists():
            p.unlink()


def _dead(model: str, output: str) -> BatchEntry:
    return BatchEntry(
        model, output, error="its worker process died (killed by the OS, perhaps out of memory)", exit_code=2
    )


def _worker(conn: Any, args: tuple[Any, ...]) -> None:
    """A batch worker: folds the models it is sent, one at a time, until it is sent None."""
    handle_termination()
    try:
        while True:
            task = conn.recv()
            if task is None:
                return
            conn.send(_fold_one(task[0], task[1], *args))
    except (EOFError, OSError, KeyboardInterrupt, Terminated):  # parent gone, or stopped: quietly
        return


@contextmanager
def _main_not_rerun() -> Iterator[None]:
    """A spawned worker re-runs the parent's main script (to find what it is to run) unless the
    script hides where it is: a plain script calling fold_many without an ``if __name__ ==
    "__main__"`` guard would run again in every worker, which would fold again and fail. The worker
    runs bnfold's own importable function, so the main script is hidden while workers start."""
    main = sys.modules.get("__main__")
    names = ("__file__", "__spec__")
    saved = {name: main.__dict__[name] for name in names if main is not None and name in main.__dict__}
    try:
        if main is not None:
            main.__dict__.pop("__file__", None)
            main.__dict__["__spec__"] = None
        yield
    finally:
        if main is not None:
            main.__dict__.pop("__spec__", None)
            main.__dict__.update(saved)


@contextmanager
def _sigint_ignored() -> Iterator[None]:
    import signal

    try:
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: nothing to do
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


class _Pool:
    """Worker processes, each sent one model at a time (see :func:`_run_pool`)."""

    def __init__(self, jobs: int, args: tuple[Any, ...]) -> None:
        import multiprocessing

        self.context = multiprocessing.get_context("spawn")
        self.jobs, self.args = jobs, args
        self.busy: dict[Any, tuple[Any, Any, tuple[str, str]]] = {}  # sentinel -> (process, conn, task)
        self.idle: list[tuple[Any, Any]] = []
        self.workers: list[tuple[Any, Any]] = []  # every one started

    def start(self) -> tuple[Any, Any]:
        ours, theirs = self.context.Pipe()
        process = self.context.Process(target=_worker, args=(theirs, self.args), daemon=True)
        self.workers.append((process, ours))
        with _sigint_ignored(), _main_not_rerun():  # SIGINT ignored: inherited; Ctrl-C reaches the parent
            process.start()
        theirs.close()
        return process, ours

    def hand_out(self, pending: list[tuple[str, str]]) -> None:
        """Send tasks to idle workers, or to new ones up to ``jobs``."""
        while pending and (self.idle or len(self.busy) < self.jobs):
            process, conn = self.idle.pop() if self.idle else self.start()
            task = pending.pop()
            try:
                conn.send(task)
            except OSError:  # it died while idle: its task goes to another
                pending.append(task)
                process.join()
                continue
            self.busy[process.sentinel] = (process, conn, task)

    def collect(self, done: Callable[[BatchEntry], None]) -> None:
        """Wait for a worker to answer or die; a dead one fails the model it held."""
        from multiprocessing.connection import wait

        by_conn = {conn: key for key, (_, conn, _) in self.busy.items()}
        for ready in wait(list(self.busy) + list(by_conn)):
            key = by_conn.get(ready, ready)
            if key not in self.busy:
                continue
            process, conn, task = self.busy[key]
            try:
                entry = conn.recv() if conn.poll() else None
            except (EOFError, OSError):
                entry = None
            del self.busy[key]  # after: an interrupt in recv leaves it busy, to be terminated
            if entry is not None:
                done(entry)
                self.idle.append((process, conn))
            else:
                process.join()
                done(_dead(*task))

    def stop(self) -> None:
        """Normally every worker is idle here and is told to stop; after an error or a signal, the
        workers are stopped whatever they were doing."""
        workers = [(p, c) for p, c in self.workers if p.pid is not None]  # a signal can come before start
        for process, conn in workers:
            try:
                conn.send(None)
            except OSError:
                pass
            if self.busy:
                process.terminate()
        for process, conn in workers:
            process.join(5)
            if process.is_alive():
                process.kill()
                process.join()
            conn.close()


def _run_pool(
    tasks: list[tuple[str, str]], jobs: int, args: tuple[Any, ...], done: Callable[[BatchEntry], None]
) -> None:
    """Fold in ``jobs`` worker processes, each sent one model at a time. A worker that dies (killed
    by the OS, out of memory) fails the model it held, in one line, and a fresh one takes its place.

    Workers are spawned, not forked: a forked worker can deadlock on a lock that a thread of the
    parent (onnxruntime's thread pools, after a verification) held at the moment of the fork.
    concurrent.futures is not used: after a worker died, its broken pool could hang (Python 3.13)."""
    pool = _Pool(jobs, args)
    pending = list(reversed(tasks))
    try:
        while pending or pool.busy:
            pool.hand_out(pending)
            pool.collect(done)
    finally:
        pool.stop()


def fold_many(
    models: Sequence[PathLike],
    outdir: PathLike,
    options: FoldOptions | None = None,
    *,
    jobs: int = 1,
    verify: VerifyOptions | None = None,
    keep_failed: bool = True,
    progress: Callable[[str], None] | None = None,
    **overrides: Any,
) -> BatchReport:
    """Fold each model into ``outdir`` (created if needed) under its own file name, ``jobs`` at a
    time in worker processes; with ``verify`` (a :class:`VerifyOptions`), check each against its
    original. Fold options as for :func:`fold` (``in_place`` does not apply). A model that fails
    does not stop the others. ``keep_failed=False`` removes outputs that fail verification.
    ``progress`` is called with each model's name as it finishes."""
    o = FoldOptions.of(options, **overrides)
    if o.in_place:
        raise OptionError("in_place", "folds one model at a time; fold_many writes into a folder")
    out = Path(outdir)
    if out.exists() and not out.is_dir():
        raise BnfoldError(f"{out}: exists and is not a folder; several models need a folder for their outputs")
    names = [Path(m).name for m in models]
    if len(set(names)) != len(names):
        raise BnfoldError("two input models have the same file name; they would overwrite each other in the folder")
    if not o.dry_run:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BnfoldError(f"{out}: cannot create the folder ({exc.strerror})") from None
    tasks = [(str(m), str(out / Path(m).name)) for m in models]
    results: dict[str, BatchEntry] = {}

    def done(entry: BatchEntry) -> None:
        results[entry.input] = entry
        if progress:
            progress(Path(entry.input).name)

    if jobs > 1 and len(tasks) > 1:
        _run_pool(tasks, jobs, (o, verify, keep_failed), done)
    else:
        for model, output in tasks:
            done(_fold_one(model, output, o, verify, keep_failed))
    return BatchReport(str(out), [results[i] for i, _ in tasks])
