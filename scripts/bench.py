"""Benchmark bnfold against onnxruntime's offline optimizer and the Python peers.

    python scripts/bench.py                     # every model, every installed tool, 5 runs each
    python scripts/bench.py --models resnet50 --runs 7
    pip install -e ".[bench]"                   # the peers (never runtime dependencies)

Each tool runs as a whole process (start-up, load, fold, write), timed from start to exit, with its
own peak resident memory read from wait4(). Runs are interleaved (tool A, B, C, A, B, C, ...) so that
machine noise hits every tool alike. Prints one table: median wall time, peak RSS, BatchNormalization
nodes left, and the ratio of the median to onnxruntime's.
"""

from __future__ import annotations

import argparse
import atexit
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.models import Builder, resnet50_layout  # noqa: E402

# -- models -------------------------------------------------------------------------------------


def resnet50() -> onnx.ModelProto:
    """ResNet-50's layout (53 Conv+BN pairs, about 25.5 M parameters, ~100 MB inline)."""
    return resnet50_layout()


def deep(blocks: int, channels: int = 16) -> onnx.ModelProto:
    """``blocks`` x (Conv -> BN -> Relu): the cost of a fold must grow linearly with depth."""
    b = Builder(seed=blocks)
    y = b.input("x", [1, channels, 8, 8])
    for _ in range(blocks):
        y = b.relu(b.bn(b.conv(y, channels, channels, 3), channels))
    return b.model(y)


def chain(nodes: int, channels: int = 2) -> onnx.ModelProto:
    """``nodes`` / 3 x (Conv -> BN -> Relu) with a value_info entry for every value: folding must
    stay linear in the graph size, declarations included."""
    from onnx import helper, numpy_helper

    graph_nodes, inits, infos, x = [], [], [], "x"
    shape = [1, channels, 4, 4]
    for i in range(nodes // 3):
        inits.append(numpy_helper.from_array(np.full((channels, channels, 1, 1), 0.5, np.float32), f"w{i}"))
        for p, v in (("g", 1.0), ("b", 0.1), ("m", 0.0), ("v", 1.0)):
            inits.append(numpy_helper.from_array(np.full(channels, v, np.float32), f"{p}{i}"))
        c, bn, r = f"c{i}", f"bn{i}", f"r{i}"
        graph_nodes += [
            helper.make_node("Conv", [x, f"w{i}"], [c], name=f"conv{i}"),
            helper.make_node("BatchNormalization", [c, f"g{i}", f"b{i}", f"m{i}", f"v{i}"], [bn], name=f"bnn{i}"),
            helper.make_node("Relu", [bn], [r], name=f"relu{i}"),
        ]
        infos += [helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, shape) for t in (c, bn, r)]
        x = r
    graph = helper.make_graph(
        graph_nodes,
        "chain",
        [helper.make_tensor_value_info("x", 1, shape)],
        [helper.make_tensor_value_info(x, 1, shape)],
        inits,
        value_info=infos,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


def write_external(path: Path, gigabytes: float) -> None:
    """A model with ``gigabytes`` of weights in one external data file, written in chunks (never held
    in memory): 40 Conv+BN blocks (512 channels, 3x3) and, to make up the size, 4096-wide Gemm layers
    without BN, whose weights a fold leaves unchanged."""
    data_name = path.name + ".data"
    nodes, inits = [], []
    rng = np.random.default_rng(0)
    offset = 0
    with open(path.with_name(data_name), "wb") as data:

        def external(name, shape, scale=0.02):
            nonlocal offset
            count = int(np.prod(shape))
            done = 0
            while done < count:
                n = min(count - done, 1 << 24)
                data.write((rng.standard_normal(n, dtype=np.float32) * scale).tobytes())
                done += n
            t = TensorProto(
                name=name, data_type=TensorProto.FLOAT, dims=list(shape), data_location=TensorProto.EXTERNAL
            )
            for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(count * 4))):
                e = t.external_data.add()
                e.key, e.value = k, v
            offset += count * 4
            inits.append(t)
            return name

        c, y = 512, "x"
        for i in range(40):
            w = external(f"conv{i}_w", (c, c, 3, 3))
            params = [
                numpy_helper.from_array(a.astype(np.float32), f"bn{i}_{k}")
                for k, a in (
                    ("g", rng.uniform(0.5, 1.5, c)),
                    ("b", rng.standard_normal(c) * 0.1),
                    ("m", rng.standard_normal(c) * 0.1),
                    ("v", rng.uniform(0.5, 2, c)),
                )
            ]
            inits.extend(params)
            nodes.append(helper.make_node("Conv", [y, w], [f"c{i}"], name=f"conv{i}", pads=[1] * 4))
            nodes.append(
                helper.make_node("BatchNormalization", [f"c{i}"] + [p.name for p in params], [f"bn{i}"], name=f"bn{i}")
            )
            nodes.append(helper.make_node("Relu", [f"bn{i}"], [f"r{i}"]))
            y = f"r{i}"
        nodes.append(helper.make_node("GlobalAveragePool", [y], ["gap"]))
        nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], axis=1))
        y, width, k = "flat", c, 0
        while offset < gigabytes * 1e9:
            out_w = 4096
            w = external(f"fc{k}_w", (width, out_w))
            nodes.append(helper.make_node("MatMul", [y, w], [f"fc{k}"], name=f"fc{k}"))
            y, width, k = f"fc{k}", out_w, k + 1
    graph = helper.make_graph(
        nodes,
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 8, 8])],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, [1, width])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    path.write_bytes(model.SerializeToString())


# -- tools --------------------------------------------------------------------------------------

PY = sys.executable
TOOLS = {
    # name: (module that must import, command builder)
    "bnfold": (None, lambda i, o: [str(Path(PY).with_name("bnfold")), "fold", i, "-o", o]),
    # Not a folder: copying the model and its data file, the floor for models with external data.
    "cp": (None, lambda i, o: ["sh", "-c", 'cp "$0" "$1" && cp "$0.data" "$1.data"', i, o]),
    "onnxruntime": (
        "onnxruntime",
        lambda i, o: [
            PY,
            "-c",
            (
                "import sys, onnxruntime as ort\n"
                "o = ort.SessionOptions(); o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC\n"
                "o.optimized_model_filepath = sys.argv[2]\n"
                "import os\n"
                "if os.path.exists(sys.argv[1] + '.data'):\n"
                "    o.add_session_config_entry('session.optimized_model_external_initializers_file_name', os.path.basename(sys.argv[2]) + '.data')\n"
                "    o.add_session_config_entry('session.optimized_model_external_initializers_min_size_in_bytes', '1024')\n"
                "ort.InferenceSession(sys.argv[1], o, providers=['CPUExecutionProvider'])"
            ),
            i,
            o,
        ],
    ),
    "onnxscript": (
        "onnxscript",
        lambda i, o: [
            PY,
            "-c",
            (
                "import sys, onnx, onnxscript.rewriter as r\n"
                "from onnxscript.rewriter.rules.common import _fuse_batchnorm as f\n"
                "m = r.rewrite(onnx.load(sys.argv[1]), pattern_rewrite_rules=f.rules)\n"
                "onnx.save(m, sys.argv[2])"
            ),
            i,
            o,
        ],
    ),
    "onnxoptimizer": (
        "onnxoptimizer",
        lambda i, o: [
            PY,
            "-c",
            (
                "import sys, onnx, onnxoptimizer\n"
                "onnx.save(onnxoptimizer.optimize(onnx.load(sys.argv[1]), ['fuse_bn_into_conv']), sys.argv[2])"
            ),
            i,
            o,
        ],
    ),
    "onnxslim": (
        "onnxslim",
        lambda i, o: [PY, "-c", "import sys, onnxslim; onnxslim.slim(sys.argv[1], sys.argv[2])", i, o],
    ),
    "onnxsim": (
        "onnxsim",
        lambda i, o: [
            PY,
            "-c",
            ("import sys, onnx, onnxsim\nm, ok = onnxsim.simplify(onnx.load(sys.argv[1]))\nonnx.save(m, sys.argv[2])"),
            i,
            o,
        ],
    ),
}


def available(tools):
    out = []
    for name in tools:
        module = TOOLS[name][0]
        if module is None or subprocess.run([PY, "-c", f"import {module}"], capture_output=True).returncode == 0:
            out.append(name)
    return out


# A minimal timer process runs each tool: it forks and execs the tool and reports the child's own
# wall time and peak RSS from wait4(). (Measured from this script directly, ru_maxrss would include
# this script's memory, which a fork copies before the exec.)
TIMER = (
    "import os, sys, time\n"
    "t = time.perf_counter()\n"
    "pid = os.fork()\n"
    "if pid == 0:\n"
    "    fd = os.open(os.devnull, os.O_WRONLY); os.dup2(fd, 1)\n"
    "    os.execvp(sys.argv[1], sys.argv[1:])\n"
    "_, status, ru = os.wait4(pid, 0)\n"
    "print(time.perf_counter() - t, ru.ru_maxrss, os.waitstatus_to_exitcode(status))\n"
)


def work_folder(given: str | None, prefix: str) -> Path:
    """The folder the user named, or a temporary one that is removed when the script ends."""
    if given:
        Path(given).mkdir(parents=True, exist_ok=True)
        return Path(given)
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def run_once(cmd, timeout):
    """(wall seconds, peak RSS in MiB, ok) of one whole process."""
    try:
        done = subprocess.run([PY, "-S", "-c", TIMER] + cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return timeout, 0.0, False
    try:
        wall, rss_kb, code = done.stdout.split()
    except ValueError:
        return 0.0, 0.0, False
    return float(wall), int(rss_kb) / 1024, int(code) == 0


def bn_left(path: Path):
    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception:
        return "?"
    count = 0

    def walk(g):
        nonlocal count
        for n in g.node:
            count += n.op_type == "BatchNormalization"
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)

    walk(m.graph)
    return count


def bench(name: str, path: Path, tools, runs: int, work: Path, timeout: float):
    if not path.with_name(path.name + ".data").exists():
        tools = [t for t in tools if t != "cp"]
    results = {t: [] for t in tools}
    rss = dict.fromkeys(tools, 0.0)
    ok = dict.fromkeys(tools, True)
    left = {}
    for _r in range(runs):
        for t in tools:
            if not ok[t]:
                continue
            out = work / f"{name}_{t}.onnx"
            for f in (out, out.with_name(out.name + ".data")):
                if f.exists():
                    f.unlink()
            wall, peak, good = run_once(TOOLS[t][1](str(path), str(out)), timeout)
            if not good:
                ok[t] = False
                continue
            results[t].append(wall)
            rss[t] = max(rss[t], peak)
            left[t] = bn_left(out)
    rows = []
    ref = statistics.median(results["onnxruntime"]) if results.get("onnxruntime") else None
    for t in tools:
        if not results[t]:
            rows.append((name, t, None, None, "failed", None))
            continue
        med = statistics.median(results[t])
        rows.append((name, t, med, rss[t], left[t], med / ref if ref else None))
    return rows


def verify_overhead(original: Path, folded: Path, samples: int, repeats: int):
    """Median seconds of bnfold.verify and of the bare onnxruntime work it needs (two unoptimized CPU
    sessions, the same random inputs, both models run on each), measured alternately in one process."""
    import onnxruntime as ort

    import bnfold
    from bnfold.verification import input_specs, random_input, resolve_shape

    specs = input_specs(onnx.load(str(original), load_external_data=False))  # outside the timing

    def bare():
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        a = ort.InferenceSession(str(original), opts, providers=["CPUExecutionProvider"])
        b = ort.InferenceSession(str(folded), opts, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        for _ in range(samples):
            feeds = {n: random_input(rng, dt, resolve_shape(n, d, {}, {})) for n, dt, d in specs}
            a.run(None, feeds)
            b.run(None, feeds)

    times = {"bare": [], "bnfold": []}
    for _ in range(repeats):
        t = time.perf_counter()
        bare()
        times["bare"].append(time.perf_counter() - t)
        t = time.perf_counter()
        # This random 53-layer network amplifies float32 rounding: onnxruntime's own Conv+BN fusion
        # differs from the unoptimized model by ~1e-3 relative at the output too: loose tolerances here.
        assert bnfold.verify(original, folded, samples=samples, rtol=5e-2, atol=1e-3)
        times["bnfold"].append(time.perf_counter() - t)
    return statistics.median(times["bnfold"]), statistics.median(times["bare"])


def byte_compile_bnfold() -> None:
    """Byte-compile bnfold's modules, as pip does when it installs a package: a source checkout run
    with PYTHONDONTWRITEBYTECODE set (an editable install in CI, say) would otherwise compile every
    module from source in every timed run (0.1 to 0.15 s here), which the installed tools never do."""
    import compileall

    import bnfold

    compileall.compile_dir(str(Path(bnfold.__file__).parent), quiet=1)


YARDSTICK = "import time\nt = time.perf_counter()\nx = 0\nfor i in range(10_000_000):\n    x += i\nprint(time.perf_counter() - t)"


def yardstick() -> float:
    """Seconds a fixed 10M-iteration Python loop takes now: this machine's speed moves by a factor of
    two or more within minutes, and the loop, timed before and after the rounds, says how fast it was."""
    done = subprocess.run([PY, "-S", "-c", YARDSTICK], capture_output=True, text=True, check=True)
    return float(done.stdout)


def start_up(runs: int = 5) -> float:
    """Median wall seconds of a process that imports onnx and exits: the floor under every tool that
    uses onnx from Python (numpy, protobuf and ml_dtypes come with it)."""
    return statistics.median(run_once([PY, "-c", "import onnx"], 60)[0] for _ in range(runs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet50,deep100,deep1000,chain100k,external2.5g")
    ap.add_argument("--tools", default=",".join(TOOLS))
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--external-gb", type=float, default=2.5)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--workdir", default=None, help="where models and outputs go (default: a temporary folder)")
    args = ap.parse_args()
    tools = available([t for t in args.tools.split(",") if t in TOOLS])
    work = work_folder(args.workdir, "bnfold-bench-")
    byte_compile_bnfold()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"onnx {onnx.__version__}, numpy {np.__version__}, ml_dtypes {version('ml_dtypes')}; "
        f"tools: {', '.join(tools)}; {args.runs} runs each, interleaved; bnfold byte-compiled"
    )
    print(f"start-up: python -c 'import onnx' {start_up():.3f} s (median of 5)")
    loop_before = yardstick()
    rows, notes = [], []
    for name in args.models.split(","):
        path = work / f"{name}.onnx"
        if not path.exists():
            if name == "resnet50":
                onnx.save(resnet50(), str(path))
            elif name.startswith("chain"):
                onnx.save(chain(int(name[5:-1]) * 1000), str(path))
            elif name.startswith("deep"):
                onnx.save(deep(int(name[4:])), str(path))
            elif name.startswith("external"):
                write_external(path, args.external_gb)
        size = path.stat().st_size + (
            path.with_name(path.name + ".data").stat().st_size if path.with_name(path.name + ".data").exists() else 0
        )
        notes.append(f"{name}: {size / 1e6:,.1f} MB, {bn_left(path)} BatchNormalization")
        # The chain is for bnfold's own scaling; the Python peers take minutes on it.
        model_tools = [t for t in tools if t in ("bnfold", "onnxruntime")] if name.startswith("chain") else tools
        rows += bench(name, path, model_tools, args.runs, work, args.timeout)
    print(f"yardstick: a 10M-iteration Python loop {loop_before:.2f} s before the rounds, {yardstick():.2f} s after")
    for n in notes:
        print(n)
    print()
    print(
        f"| {'model':12} | {'tool':14} | {'median s':>9} | {'peak RSS MiB':>12} | {'BN left':>7} | {'x onnxruntime':>13} |"
    )
    print(f"|{'-' * 14}|{'-' * 16}|{'-' * 11}|{'-' * 14}|{'-' * 9}|{'-' * 15}|")
    for model, tool, med, peak, left, ratio in rows:

        def fmt(v, f):
            return "-" if v is None else format(v, f)

        print(
            f"| {model:12} | {tool:14} | {fmt(med, '9.3f')} | {fmt(peak, '12.0f')} | {left!s:>7} | {fmt(ratio, '13.2f')} |"
        )
    folded = work / "resnet50_bnfold.onnx"
    if "resnet50" in args.models.split(",") and folded.exists():
        mine, bare = verify_overhead(work / "resnet50.onnx", folded, samples=5, repeats=max(3, args.runs))
        print(
            f"\nverify resnet50, 5 samples: bnfold.verify {mine:.3f} s, bare onnxruntime runs {bare:.3f} s "
            f"({(mine / bare - 1) * 100:+.1f}%)"
        )
    # The deep models must cost linearly: 1000 blocks at most 12x 100 blocks.
    by = {(m, t): med for m, t, med, *_ in rows}
    if ("deep100", "bnfold") in by and ("deep1000", "bnfold") in by and by[("deep100", "bnfold")]:
        print(f"\nbnfold deep1000 / deep100: {by[('deep1000', 'bnfold')] / by[('deep100', 'bnfold')]:.2f}x")
    for model, tool, med, *_ in rows:
        if tool == "cp" and med and (model, "bnfold") in by and by[(model, "bnfold")]:
            print(f"bnfold {model} / copying its files: {by[(model, 'bnfold')] / med:.2f}x")


if __name__ == "__main__":
    main()
