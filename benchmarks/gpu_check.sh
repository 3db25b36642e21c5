#!/usr/bin/env bash
# One short check on a machine with a CUDA GPU (issue 13, part 3): the `gpu` tests, then the SISA
# benchmark on CUDA and on CPU in the same run, and one JSON document of figures on stdout:
# training throughput (samples/s), single-deletion retrain speed-up vs the paper's 3SR/(2R+1),
# and CPU vs GPU. Progress and test output go to stderr. About 5-10 minutes.
#
#   bash benchmarks/gpu_check.sh [--records N]        (default 20000; pass --quick for ~1 minute each)
#
# Needs the project's environment with a CUDA build of torch (pip install torch --index-url
# https://download.pytorch.org/whl/cu128); PYTHON overrides the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" CUBLAS_WORKSPACE_CONFIG=:4096:8
unset ERASURE_DEVICE
BENCH_ARGS=("$@")
[ ${#BENCH_ARGS[@]} -eq 0 ] && BENCH_ARGS=(--records 20000 --repeats 2 --batch-k 1,4 --batch-draws 1 --hard-dim 0
                                           --sweep-shards 1,8 --sweep-slices 1,4)
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

"$PYTHON" - >&2 <<'EOF'
import torch
assert torch.cuda.is_available(), f"no CUDA: torch {torch.__version__} (a CPU build?) or no driver"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}")
EOF

echo "== pytest -m gpu" >&2
set +e
"$PYTHON" -m pytest -q -p no:cacheprovider -m gpu tests/integration/test_gpu.py tests/unit/test_sisa_parts.py \
  -o addopts="" >"$OUT/pytest.txt" 2>&1
PYTEST_RC=$?
set -e
tail -n 15 "$OUT/pytest.txt" >&2

for device in cuda cpu; do
  echo "== bench_sisa.py on $device" >&2
  "$PYTHON" benchmarks/bench_sisa.py --device "$device" "${BENCH_ARGS[@]}" >"$OUT/sisa-$device.json"
done

"$PYTHON" - "$OUT" "$PYTEST_RC" <<'EOF'
import json, re, sys
from pathlib import Path

out, pytest_rc = Path(sys.argv[1]), int(sys.argv[2])
summary = (out / "pytest.txt").read_text().strip().splitlines()[-1]
figures = {}
for device in ("cuda", "cpu"):
    doc = json.loads((out / f"sisa-{device}.json").read_text())
    main, single = doc["main"], doc["main"]["single_deletion"]
    figures[device] = {
        "device": doc["settings"]["device"],
        "shards": main.get("shards"), "slices": main.get("slices"),
        "full_training_seconds": main["full_training_seconds"],
        "training_throughput_samples_per_s": main["full_training_samples"] / main["full_training_seconds"],
        "retrain_mean_seconds": single["mean_seconds"],
        "retrain_speedup": single["measured_speedup"],
        "theoretical_speedup": single["theoretical_speedup"],
        "ratio_to_theoretical": single["ratio_to_theoretical"],
        "ensemble_accuracy": main["accuracy"]["ensemble"]["mean_prob"],
    }
gpu, cpu = figures["cuda"], figures["cpu"]
print(json.dumps({
    "benchmark": "gpu_check",
    "pytest_gpu": {"exit_code": pytest_rc, "summary": summary},
    "sisa": figures,
    "gpu_vs_cpu": {
        "training_throughput_ratio": gpu["training_throughput_samples_per_s"] / cpu["training_throughput_samples_per_s"],
        "retrain_seconds_ratio_cpu_over_gpu": cpu["retrain_mean_seconds"] / gpu["retrain_mean_seconds"],
    },
}, indent=2))
sys.exit(1 if pytest_rc else 0)
EOF
