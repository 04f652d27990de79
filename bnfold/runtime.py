"""Which onnxruntime is installed, read from the installed distributions' metadata (without
importing it): onnxruntime and onnxruntime-gpu install the same module, and installed together
the last one installed silently wins, file by file."""

from __future__ import annotations

import re
from importlib import metadata

# Distributions that install the ``onnxruntime`` module.
RUNTIMES = (
    "onnxruntime",
    "onnxruntime-gpu",
    "onnxruntime-directml",
    "onnxruntime-openvino",
    "onnxruntime-qnn",
    "onnxruntime-training",
    "ort-nightly",
    "ort-nightly-gpu",
)


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_runtimes() -> list[tuple[str, str]]:
    """(distribution, version) of every installed distribution that provides ``onnxruntime``."""
    found = {}
    for dist in metadata.distributions():
        name = _normal(dist.name or "")
        if name in RUNTIMES:
            found[name] = dist.version
    return sorted(found.items())


def conflict() -> str | None:
    """One line saying that several onnxruntime packages are installed, with the fix; else None."""
    runtimes = installed_runtimes()
    if len(runtimes) < 2:
        return None
    names = " and ".join(f"{n} {v}" for n, v in runtimes)
    keep = "gpu" if any(n.endswith("gpu") for n, _ in runtimes) else "cpu"
    return (
        f"{names} are installed together: they install the same module and overwrite each other. "
        f"Fix: pip uninstall -y {' '.join(n for n, _ in runtimes)} && pip install 'bnfold[{keep}]'"
    )
