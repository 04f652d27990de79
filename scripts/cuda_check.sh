#!/usr/bin/env bash
# The whole CUDA check, for a machine with an NVIDIA GPU (driver installed):
#   bash scripts/cuda_check.sh
# Installs bnfold with onnxruntime-gpu (never together with onnxruntime) in its own venv, then runs
# the CUDA tests and a fold + verification of the demo model on CPU and CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-cuda
.venv-cuda/bin/pip install -q -e ".[gpu,test]"
.venv-cuda/bin/python -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || true
.venv-cuda/bin/python -m pytest -m cuda -v tests/test_verify.py
out=$(mktemp -d)
.venv-cuda/bin/bnfold fold models/demo.onnx -o "$out/demo_folded.onnx" --verify --providers cpu,cuda --samples 5 --per-layer --dim batch=4
.venv-cuda/bin/bnfold verify models/demo.onnx "$out/demo_folded.onnx" --providers cuda --allow-tf32 --dim batch=4
