"""What the reports say: numbers that are the result's, words that match the numbers, and no run that
looks like it did something it did not."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from test_safety import _warnings, conv_bn

import bnfold
from bnfold.cli import cli
from models import calibrate, densenet_preact, resnet_bottleneck

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "models" / "demo.onnx"


@pytest.mark.parametrize("lower", [False, True], ids=["default", "lower_standalone"])
@pytest.mark.parametrize("make", [resnet_bottleneck, densenet_preact], ids=["resnet", "densenet"])
def test_a_dry_run_reports_the_numbers_the_fold_gives(make, lower):
    model = make()
    untouched, dry = bnfold.fold(model, dry_run=True, lower_standalone=lower)
    _, real = bnfold.fold(model, lower_standalone=lower)
    assert untouched.SerializeToString() == model.SerializeToString()  # a dry run changes nothing
    assert dry.after == real.after
    assert dry.after.batchnorms < dry.before.batchnorms or (make is densenet_preact and not lower)  # all pre-activation


def test_the_demo_dry_run_table_is_the_folds():
    """The README's first command prints 8 -> 2 BNs, 32 -> 23 nodes, 47 -> 26 initializers."""
    dry = CliRunner().invoke(cli, ["fold", str(DEMO), "--dry-run"]).output.splitlines()
    assert dry[2].split() == ["BatchNorm", "8", "2"] and dry[3].split() == ["nodes", "32", "23"]
    assert dry[4].split() == ["initializers", "47", "26"]


def test_verify_with_a_dry_run_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(cli, ["fold", str(DEMO), "--dry-run", "--verify"])
    assert result.exit_code == 2 and "--dry-run writes none" in result.output


@pytest.mark.parametrize("gamma, words", [([1, 60, 1], "grows"), ([1, 1e-3, 1e-3], "shrinks to")])
def test_the_range_hazard_says_grows_or_shrinks_as_its_number_does(gamma, words):
    model = conv_bn(np.float32, gamma, [0, 0, 0], [0, 0, 0], [1, 1, 1])
    _, found = _warnings(model)
    hazard = found["range_inflation"]
    assert words in hazard["message"], hazard
    assert (hazard["max_ratio"] > 1) == (words == "grows")


def test_lowered_bns_are_listed_as_lowered_not_folded():
    text = CliRunner().invoke(cli, ["fold", str(DEMO), "--dry-run", "--lower-standalone"]).output
    assert "folded (6):" in text and "lowered to Mul + Add by per-channel constants (2):" in text
    assert "Mul+Add Mul+Add" not in text


# -- no vacuous pass --------------------------------------------------------------------------------


def _dead_relu(two_outputs: bool = False):
    """Conv -> BN -> Relu whose BN shifts everything far below 0: the output is all zeros."""
    from models import Builder

    b = Builder(seed=2)
    x = b.input("x", ["N", 3, 6, 6])
    y = b.conv(x, 3, 4, 3)
    params = [
        b.const(np.ones(4), "g"),
        b.const(np.full(4, -1e3), "beta"),
        b.const(np.zeros(4), "m"),
        b.const(np.ones(4), "v"),
    ]
    dead = b.relu(b.bn(y, 4, params=params))
    outputs = [dead]
    if two_outputs:
        outputs.append(b.relu(b.bn(b.conv(x, 3, 4, 3), 4)))
    return b.model(*outputs)


def test_a_reference_that_is_all_zeros_is_no_pass(tmp_path):
    import onnx

    model = _dead_relu()
    folded, _ = bnfold.fold(model)
    with pytest.raises(bnfold.BnfoldError, match=r"outputs are constant on these inputs: relu0 \(all 0\).*--inputs"):
        bnfold.verify(model, folded, dims={"N": 2})
    onnx.save(model, str(tmp_path / "m.onnx"))
    onnx.save(folded, str(tmp_path / "f.onnx"))
    result = CliRunner().invoke(cli, ["verify", str(tmp_path / "m.onnx"), str(tmp_path / "f.onnx")])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output


def test_a_constant_output_beside_informative_ones_is_said():
    model = _dead_relu(two_outputs=True)
    folded, _ = bnfold.fold(model)
    result = bnfold.verify(model, folded, dims={"N": 2})
    assert result, result.render_text()
    note = next(n for n in result.notes if n.startswith("warning: constant"))
    assert "relu0" in note and "--inputs" in note
    assert note in result.render_text() and note in result.to_json()


def _cancelling(offset: float):
    """A first layer whose outputs sit near ``offset`` and vary by a few hundredths, normalized by its
    BN: float32 keeps few digits of the variation, so rounding alone moves the output by ~1e-3
    relative at offset 1000 (onnxruntime's own fusion included), against ~3e-7 at offset 0."""
    from models import Builder

    b = Builder(seed=4)
    x = b.input("x", ["N", 8, 8, 8])
    y = b.op("Conv", [x, b.const(b.randn(8, 8, 3, 3, scale=0.01), "w"), b.const(np.full(8, offset), "b")], pads=[1] * 4)
    y = b.op("Conv", [b.bn(y, 8), b.const(b.randn(8, 8, 3, 3, scale=0.2), "w")], pads=[1] * 4)
    return calibrate(b.model(b.bn(y, 8)), {"N": 2})


def test_a_weak_check_is_said_with_what_to_do():
    """Where the floor lifts the bound above the threshold, a one-layer error as small would pass:
    the report says so (text and JSON), advising real inputs unless they were given."""
    quiet = _cancelling(0.0)
    report = bnfold.verify(quiet, bnfold.fold(quiet)[0], dims={"N": 2})
    assert report and not [n for n in report.notes if "weak check" in n], report.notes
    model = _cancelling(1000.0)
    folded, _ = bnfold.fold(model)
    report = bnfold.verify(model, folded, dims={"N": 2})
    out = report.outputs[0]
    assert report and out.bound > out.threshold, report.render_text()
    note = next(n for n in report.notes if n.startswith("warning: a weak check"))
    assert out.name in note and "--inputs FILE.npz" in note and "--per-layer" in note
    assert note in report.render_text() and note in report.to_json()
    given = {"x": np.random.default_rng(1).standard_normal((2, 8, 8, 8)).astype(np.float32)}
    report = bnfold.verify(model, folded, inputs=given)
    note = next(n for n in report.notes if n.startswith("warning: a weak check"))
    assert "--inputs" not in note and "--per-layer" in note


def test_a_layer_is_held_to_its_own_floor_so_a_correct_fold_passes_per_layer():
    """Where rounding alone moves a layer by more than the threshold (onnxruntime's own fusion of the
    cancelling layer: ~6e-4 against 1e-4), the layer's bound follows its floor: the correct fold
    passes with --per-layer (it failed there before), one channel scaled by 1.01 still fails, named."""
    from models import perturb_channel

    model = _cancelling(1000.0)
    folded, _ = bnfold.fold(model)
    report = bnfold.verify(model, folded, dims={"N": 2}, per_layer=True)
    (layer,) = report.layers
    assert report, report.render_text()
    assert layer.error > layer.threshold and layer.decided_by == "baseline" and layer.baseline_error
    assert layer.bound == pytest.approx(4 * layer.baseline_error)
    wrong, name = perturb_channel(folded, model, 1.01, at=0.0)
    report = bnfold.verify(model, wrong, dims={"N": 2}, per_layer=True)
    assert not report and report.first_divergent_layer == name == "bn0", report.render_text()


# -- errors that fix the run ------------------------------------------------------------------------


def _needs_a_size(tmp_path):
    """A Reshape to a fixed 2x6 shape: onnxruntime cannot run it unless the dynamic batch is 2."""
    import onnx

    from models import Builder

    b = Builder(seed=3)
    x = b.input("x", ["batch", 3])
    y = b.op("Reshape", [b.gemm(x, 3, 6), b.const(np.array([2, 6]), "shape", dtype=np.int64)])
    model = b.model(b.relu(b.bn(y, 6)))
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    return path


def test_when_onnxruntime_cannot_run_the_inputs_the_error_says_what_was_fed_and_how_to_change_it(tmp_path):
    path = _needs_a_size(tmp_path)
    assert CliRunner().invoke(cli, ["fold", str(path), "-o", str(tmp_path / "f.onnx"), "-q"]).exit_code == 0
    result = CliRunner().invoke(cli, ["verify", str(path), str(tmp_path / "f.onnx")])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    for words in ("x [1, 3]", "dynamic dimensions left at 1: batch", "--dim NAME=SIZE", "--inputs FILE.npz"):
        assert words in result.output, result.output
    assert CliRunner().invoke(cli, ["verify", str(path), str(tmp_path / "f.onnx"), "--dim", "batch=2"]).exit_code == 0


def test_fold_verify_says_what_became_of_the_written_model(tmp_path):
    path = _needs_a_size(tmp_path)
    out = tmp_path / "f.onnx"
    result = CliRunner().invoke(cli, ["fold", str(path), "-o", str(out), "--verify"])
    assert result.exit_code == 2, result.output
    assert f"the folded model was written to {out}, not verified" in result.output and out.exists()


def test_fold_json_has_one_shape_with_and_without_verify(tmp_path):
    import json

    plain = json.loads(CliRunner().invoke(cli, ["fold", str(DEMO), "-o", str(tmp_path / "a.onnx"), "--json"]).output)
    verified = json.loads(
        CliRunner().invoke(cli, ["fold", str(DEMO), "-o", str(tmp_path / "b.onnx"), "--json", "--verify"]).output
    )
    assert set(plain) == set(verified) and plain["verify"] is None and verified["verify"]["passed"] is True
    assert plain["after"] == verified["after"]


@pytest.mark.parametrize("command", [["fold", str(DEMO), "--dry-run"], ["verify", str(DEMO), str(DEMO)]])
def test_json_and_quiet_together_are_a_usage_error(command):
    result = CliRunner().invoke(cli, [*command, "--json", "-q"])
    assert result.exit_code == 2 and "choose one" in result.output


# -- verify at scale: one model in memory at a time --------------------------------------------------


def test_verify_holds_one_onnxruntime_session_at_a_time(monkeypatch):
    """Reference, baseline and candidate run one after another: never two sessions alive."""
    import weakref

    import bnfold.verification.stages as stages

    real, alive, most = stages.make_session, weakref.WeakSet(), []

    class Held:  # onnxruntime's session type takes no weak references: a wrapper is counted instead
        def __init__(self, sess):
            self.sess = sess

        def __getattr__(self, name):
            return getattr(self.sess, name)

    def counted(*args, **kwargs):  # no gc.collect() here: sessions must go with their last reference
        held = Held(real(*args, **kwargs))
        alive.add(held)
        most.append(len(alive))
        return held

    monkeypatch.setattr(stages, "make_session", counted)
    model = resnet_bottleneck()
    folded, _ = bnfold.fold(model)
    assert bnfold.verify(model, folded, dims={"N": 2}, per_layer=True, samples=2)
    assert len(most) == 4 and max(most) == 1, (
        most
    )  # the candidate as written (per-layer), reference, baseline, candidate


def test_freed_memory_goes_back_to_the_system_after_each_session(monkeypatch):
    """malloc_trim after the reference, the baseline and each candidate session: the next session
    maps its weights, so glibc's freed pages would only add to it."""
    import bnfold.verification.stages as stages

    trims = []

    class Libc:
        def malloc_trim(self, pad):
            trims.append(pad)

    monkeypatch.setattr(stages.ctypes, "CDLL", lambda name: Libc())
    model = resnet_bottleneck()
    folded, _ = bnfold.fold(model)
    assert bnfold.verify(model, folded, dims={"N": 2}, samples=1)
    assert trims == [0, 0, 0]
    trims.clear()
    assert bnfold.verify(model, folded, dims={"N": 2}, samples=1, baseline=False)
    assert trims == [0, 0]


def _record_sessions(monkeypatch, what):
    """``what(source)`` of each onnxruntime session verify makes, taken as it is made (a temporary
    folder it loads from is gone afterwards)."""
    import bnfold.verification.stages as stages

    real, seen = stages.make_session, []

    def recorded(source, *args, **kwargs):
        seen.append(what(source))
        return real(source, *args, **kwargs)

    monkeypatch.setattr(stages, "make_session", recorded)
    return seen


def _data_inode(source):
    """The inode of the data file beside a temporary graph verify wrote (None: it loads a model as written)."""
    data = Path(source).with_name("data0.bin")
    return data.stat().st_ino if data.exists() else None


def test_sessions_map_the_weights_left_in_the_model_file(tmp_path, monkeypatch):
    """onnxruntime loads a temporary graph whose data file is a hard link to the model file, so that
    it maps the weights rather than reading them into its heap (ResNet-50 at the BASIC level: 231
    against 320 MiB). Where no link can be made: the file as written, or a copy of the data where
    the graph changed (--per-layer's declared outputs). The verdict's numbers are the same."""
    import os
    import tempfile

    import bnfold.io.load

    monkeypatch.setattr(bnfold.io.load, "SCAN_BYTES", 0)  # weights stay in the file from 64 MiB on
    model = resnet_bottleneck(c=32)  # 128 x 32 weights: large enough to stay in the file
    folded, _ = bnfold.fold(model)
    original, candidate = tmp_path / "orig.onnx", tmp_path / "folded.onnx"
    onnx.save(model, str(original))
    onnx.save(folded, str(candidate))
    seen = _record_sessions(monkeypatch, lambda source: (source, _data_inode(source)))
    inode = {original.stat().st_ino: "original", candidate.stat().st_ino: "candidate"}
    mapped = bnfold.verify(original, candidate, dims={"N": 2}).to_dict()
    assert [inode.get(ino) for _, ino in seen] == ["original", "original", "candidate"], seen
    assert all(Path(source).parent != tmp_path for source, _ in seen)

    def no_link(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    seen.clear()
    assert bnfold.verify(original, candidate, dims={"N": 2}).to_dict() == mapped
    assert [source for source, _ in seen] == [str(original), str(original), str(candidate)]

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:  # no temporary folder can be made: the files as written too
        m.setattr(tempfile, "mkdtemp", full_disk)
        seen.clear()
        assert bnfold.verify(original, candidate, dims={"N": 2}).to_dict() == mapped
        assert [source for source, _ in seen] == [str(original), str(original), str(candidate)]
    seen.clear()
    layered = bnfold.verify(original, candidate, dims={"N": 2}, per_layer=True)
    copies = [(source, ino) for source, ino in seen if Path(source).parent != tmp_path]
    assert layered and len(copies) == 3 and all(ino is not None and ino not in inode for _, ino in copies), seen


def test_a_model_file_that_is_a_link_is_mapped_from_its_target(tmp_path, monkeypatch):
    """The model file may be a link to anywhere (the user named it): the weights left in it are read
    from its target, with and without --per-layer (which refused such a model before: 'leads out of
    the model's folder')."""
    import bnfold.io.load

    monkeypatch.setattr(bnfold.io.load, "SCAN_BYTES", 0)
    model = resnet_bottleneck(c=32)
    folded, _ = bnfold.fold(model)
    (tmp_path / "cache").mkdir()
    (tmp_path / "work").mkdir()
    target, link, candidate = tmp_path / "cache" / "m.onnx", tmp_path / "work" / "m.onnx", tmp_path / "work" / "f.onnx"
    onnx.save(model, str(target))
    onnx.save(folded, str(candidate))
    link.symlink_to(target)
    inodes = _record_sessions(monkeypatch, _data_inode)
    assert bnfold.verify(link, candidate, dims={"N": 2})
    assert bnfold.verify(link, candidate, dims={"N": 2}, per_layer=True)
    assert inodes.count(target.stat().st_ino) == 4, inodes  # reference and baseline, twice


def test_separate_data_files_are_not_linked_for_an_unchanged_graph(tmp_path, monkeypatch):
    """onnxruntime maps a separate data file from the model's path already; a link would give it a
    second name while verify runs, and a check of it by another bnfold process would refuse it."""
    model = resnet_bottleneck(c=32)
    folded, _ = bnfold.fold(model)
    original, candidate = tmp_path / "orig.onnx", tmp_path / "folded.onnx"
    for proto, path in ((model, original), (folded, candidate)):
        onnx.save(proto, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=1024)
    seen = _record_sessions(monkeypatch, lambda source: (source, (tmp_path / "orig.onnx.data").stat().st_nlink))
    assert bnfold.verify(original, candidate, dims={"N": 2})
    assert seen == [(str(original), 1), (str(original), 1), (str(candidate), 1)]


def test_kept_values_spill_to_a_folder_and_give_the_same_verdict(monkeypatch):
    import bnfold.verification.stages as stages

    model = resnet_bottleneck()
    folded, _ = bnfold.fold(model)
    in_memory = bnfold.verify(model, folded, dims={"N": 2}, per_layer=True)
    monkeypatch.setattr(stages, "SPILL_BYTES", 1)
    spilled = bnfold.verify(model, folded, dims={"N": 2}, per_layer=True)
    assert in_memory.to_dict() == spilled.to_dict()


# -- output that fits the terminal ------------------------------------------------------------------


@pytest.mark.parametrize("columns", [60, 120])
@pytest.mark.parametrize(
    "command",
    [["inspect", str(DEMO)], ["fold", str(DEMO), "--dry-run"], ["fold", str(DEMO), "--dry-run", "--lower-standalone"]],
    ids=["inspect", "fold", "lowered"],
)
def test_text_fits_the_terminal_width(command, columns):
    result = CliRunner().invoke(cli, command, env={"COLUMNS": str(columns)})
    lines = result.output.splitlines()
    assert result.exit_code == 0 and lines
    assert max(len(line) for line in lines) <= columns, [line for line in lines if len(line) > columns]
    words = set(CliRunner().invoke(cli, command, env={"COLUMNS": "400"}).output.split())
    assert set(result.output.split()) == words  # wrapped at spaces, not mid-word


def test_a_name_longer_than_the_line_is_elided_in_the_middle():
    from bnfold.terminal import fit

    name = "backbone.stage4.block12.conv2.weight_quantized_dequantized"
    lines = fit(f"  bn0  stays: '{name}' is shared", 40)
    assert all(len(line) <= 40 for line in lines) and any("…" in line for line in lines)
    elided = next(line for line in lines if "…" in line).strip()
    assert elided.startswith("'backbone") and elided.endswith("dequantized'")


def test_pipes_are_not_fitted():
    result = CliRunner().invoke(cli, ["inspect", str(DEMO)], env={"COLUMNS": ""})
    assert max(len(line) for line in result.output.splitlines()) > 60  # as before: the reader's width is unknown


def test_the_progress_bar_is_made_for_the_terminal_width(monkeypatch):
    import bnfold.cli as cli_module

    made, real = {}, click.progressbar

    def progressbar(**kwargs):
        made.update(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(cli_module.click, "progressbar", progressbar)
    monkeypatch.setenv("COLUMNS", "60")
    monkeypatch.setattr(cli_module.sys.stderr, "isatty", lambda: True, raising=False)
    bar = cli_module._Progress(10, "folding", delay=0)
    bar.update(1, "a_model_with_a_name_much_longer_than_twenty.onnx")
    bar.__exit__(None, None, None)
    assert made["width"] + len("folding") + 40 <= 60 or made["width"] == 8
    assert len(made["item_show_func"]("a_model_with_a_name_much_longer_than_twenty.onnx")) == 20


def test_fold_help_groups_its_options_and_says_models():
    text = CliRunner().invoke(cli, ["fold", "--help"]).output
    fold, output, verify = (text.index(t) for t in ("Fold options:", "Output options:", "Verification options:"))
    assert fold < text.index("--strict") < output < text.index("--dry-run") < verify < text.index("--rtol")
    assert "BatchNormalization of MODELS" in text


def test_an_output_failure_with_no_layer_over_its_bound_still_names_a_layer(monkeypatch):
    """The layer where the error rose most is named when no layer crosses its bound (CSPDarknet-53's
    wrong epsilon failed at the output with no layer named)."""
    import bnfold.verification.stages as stages
    from models import calibrate, with_epsilon

    real = stages.judge_layers

    def lenient(layers, floors=None):  # as if every layer's bound were wide: only the outputs fail
        real(layers, floors)
        for s in layers:
            s.bound = float("inf")

    monkeypatch.setattr(stages, "judge_layers", lenient)
    model = calibrate(resnet_bottleneck(), {"N": 2})
    wrong, _ = bnfold.fold(with_epsilon(model, 1e-1))
    result = bnfold.verify(model, wrong, per_layer=True, dims={"N": 2})
    assert not result and result.first_divergent_layer is None
    note = next(n for n in result.notes if n.startswith("no layer crosses its bound"))
    assert "the error rises most at bn" in note and "channel" in note, note


def test_a_wrong_last_layer_that_writes_the_output_is_named():
    """A BN whose output is a graph output is compared as that output, not as a layer: when it is
    the one that is wrong, --per-layer names it (a note named an earlier layer before)."""
    from models import mobilenet_se, perturb_channel

    model = calibrate(mobilenet_se())
    folded, _ = bnfold.fold(model)
    wrong, layer = perturb_channel(folded, model, 1.01, at=1.0)
    assert layer in {o.name for o in model.graph.output}
    report = bnfold.verify(model, wrong, per_layer=True)
    assert not report and report.first_divergent_layer == layer, report.render_text()
    assert not [n for n in report.notes if n.startswith("no layer crosses")]


def test_the_suspect_is_the_largest_rise():
    from bnfold.report import ErrorStats
    from bnfold.verification.stages import _suspect

    layers = [ErrorStats(f"bn{k}", error=e, worst_channel=k) for k, e in enumerate([1e-7, 2e-7, 5e-6, 6e-6])]
    assert "at bn2 (channel 2: 5e-06, 25x the layers before it)" in _suspect(layers)
