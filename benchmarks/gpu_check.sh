#!/usr/bin/env bash
# The one prepared GPU check (issue 13): the `gpu` tests, then benchmarks/gpu.py --quick.
#
# Run from anywhere on a machine with an NVIDIA GPU (2 GPUs add the two-worker, NCCL and all-to-all
# parts; with one they are skipped):
#     benchmarks/gpu_check.sh                 # results under benchmarks/results/gpu-check/
#     OUT=/some/dir benchmarks/gpu_check.sh   # results under $OUT
#
# It installs nothing and downloads nothing. It needs a Python 3.11 environment with condmoe installed
# (pip install -e '.[dev]') and a CUDA build of torch 2.13.0 (constraints.txt's pin):
#   - `make setup` installs torch==2.13.0 as pinned; on a Linux x86_64 GPU machine with internet, PyPI's
#     torch==2.13.0 wheel IS the CUDA build (it pulls the nvidia-* runtime wheels). The CPU wheel of
#     the development machines (torch 2.13.0+cpu) will not do: this script stops with one line then.
#   - or: pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128 (another cuXYZ
#     index to match an older driver), then pip install -c constraints.txt -e '.[dev]'.
# The tests write Fashion-MNIST shards from /usr/share/datasets/fashion-mnist when the Debian package
# is installed, else from scikit-learn's digits (no download either way).
#
# PY: the interpreter (default: .venv/bin/python if present, else python3).
# TEST_TIMEOUT / BENCH_TIMEOUT: seconds for each half (defaults 480 / 300).
# Exit status: 0 when both halves pass, 1 when either fails, 2 when there is no usable CUDA GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PY:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
OUT="${OUT:-benchmarks/results/gpu-check}"
mkdir -p "$OUT"
unset DS_ACCELERATOR RAY_ADDRESS   # condmoe sets DeepSpeed's accelerator from each job's cluster.use_gpu

"$PY" - <<'EOF' 2>&1 | tee "$OUT/environment.txt"
import sys

import torch

cuda = torch.cuda.is_available()
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA build {torch.version.cuda}), "
      f"CUDA available: {cuda}")
for i in range(torch.cuda.device_count() if cuda else 0):
    p = torch.cuda.get_device_properties(i)
    print(f"  cuda:{i} {p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}")
if cuda:
    print(f"  cuDNN {torch.backends.cudnn.version()}, NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}")
import deepspeed, ray  # noqa: E401,F401  (installed next to torch)

print(f"deepspeed {deepspeed.__version__}, ray {ray.__version__}")
sys.exit(0 if cuda else 2)
EOF
status=${PIPESTATUS[0]}
if [[ $status -ne 0 ]]; then
  echo "gpu_check: no usable CUDA GPU with this interpreter ($PY); see the header of $0 for what it needs" >&2
  exit 2
fi
command -v nvidia-smi >/dev/null && nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1

echo "== pytest -m gpu ($(date -u +%H:%M:%S))"
start=$(date +%s)
timeout "${TEST_TIMEOUT:-480}" "$PY" -m pytest -m gpu -q -p no:cacheprovider -rs --durations=20 \
    --junitxml="$OUT/gpu-tests.xml" tests/ 2>&1 | tee "$OUT/gpu-tests.txt"
tests_rc=${PIPESTATUS[0]}
echo "== pytest: exit $tests_rc after $(( $(date +%s) - start )) s"

echo "== benchmarks/gpu.py --quick ($(date -u +%H:%M:%S))"
start=$(date +%s)
timeout "${BENCH_TIMEOUT:-300}" "$PY" benchmarks/gpu.py --quick --out "$OUT/gpu.json" 2>&1 | tee "$OUT/gpu-bench.txt"
bench_rc=${PIPESTATUS[0]}
echo "== benchmark: exit $bench_rc after $(( $(date +%s) - start )) s"

echo "gpu_check: tests exit $tests_rc, benchmark exit $bench_rc; results in $OUT" | tee "$OUT/summary.txt"
[[ $tests_rc -eq 0 && $bench_rc -eq 0 ]] && exit 0
exit 1
