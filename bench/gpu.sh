#!/usr/bin/env bash
# Everything this project measures on a GPU, in one run: bench/gpu.sh RESULTS_DIR
#
# Writes RESULTS_DIR/<part>.json (each script's JSON lines), <part>.log (its
# output) and summary.json (each part: exit status, seconds). Run from the
# repository root or anywhere: it finds the repository from its own path.
#
# Needs: Python >= 3.10 with torch (a CUDA build; 2.11 on the GPU image) and a
# CUDA GPU. It installs the rest with pip: the project itself
# (`pip install -e . --no-deps`) and numpy, pillow, safetensors, fsspec,
# pyarrow, pydensecrf2, matplotlib; Ray (`ray[data]==2.60.*`) for the last part
# only, which is skipped when Ray cannot be installed. Offline, point
# WHEELHOUSE at a folder of wheels for them (`pip download -d DIR ...` on a
# machine with the same Python): pip then installs from it with --no-index.
#
# Parts, with the time each takes on one H100/H200 (the timeouts below cap
# them; the whole run stays under 8 minutes):
#   install    pip installs                                  ~0.5 min (cap 90 s)
#   model      paper model's forward, bf16, channels_last,
#              batch 32 and 64, 224x224 (bench/model.py)      ~1 min (cap 100 s)
#   segmenter  paper model on 16 generated 500x375 images,
#              50 proposals + the whole image (segmenter.py)  ~1 min (cap 110 s)
#   crf        the torch dense CRF on CUDA against pydensecrf
#              (bench/crf_engines.py --device cuda, if present) ~1 min (cap 90 s)
#   pipeline   the segment job vs model only, paper model,
#              --crf none, 64 images (bench/pipeline.py; Ray)  ~2 min (cap 150 s)
# A part that fails or runs out of time is recorded in summary.json and the
# script goes on. The times are estimates, not yet measured on a GPU; the
# first run's summary.json gives the real seconds of each part.
#
# GPU_BENCH_TINY=1 shrinks every part (tiny model, a few images, CPU allowed,
# the CRF on CPU): a check that the script runs end to end, not a measurement.
# GPU_BENCH_NO_INSTALL=1 skips the pip installs (an environment that has them);
# PYTHON names the interpreter (default python3).

set -u
OUT=${1:?usage: bench/gpu.sh RESULTS_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
PY=${PYTHON:-python3}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" RAY_USAGE_STATS_ENABLED=0 AWS_EC2_METADATA_DISABLED=true

if [ "${GPU_BENCH_TINY:-0}" = 1 ]; then
    PRESET=tiny; BATCHES="2 4"; ITERS=2; IMAGES=1; PROPOSALS=4; SEG_BATCH=8; JOB_IMAGES=4
    CRF_DEVICE=cpu; REPEATS=1; CAP_SCALE=4  # a CPU is slow: longer caps
else
    PRESET=paper; BATCHES="32 64"; ITERS=10; IMAGES=16; PROPOSALS=50; SEG_BATCH=64; JOB_IMAGES=64
    CRF_DEVICE=cuda; REPEATS=3; CAP_SCALE=1
fi
export OUT PY CAP_SCALE PRESET BATCHES ITERS IMAGES PROPOSALS SEG_BATCH JOB_IMAGES CRF_DEVICE REPEATS

SUMMARY="$OUT/summary.tsv"
: > "$SUMMARY"
part() {  # part NAME CAP_SECONDS COMMAND...: run, log, record status and seconds
    local name=$1 cap=$(($2 * CAP_SCALE)); shift 2
    local start=$SECONDS
    echo "== $name (cap ${cap}s): $*"
    if declare -F "$1" > /dev/null; then  # a function of this script: timeout runs it in a bash
        timeout "$cap" bash -c "$*" > "$OUT/$name.log" 2>&1
    else
        timeout "$cap" "$@" > "$OUT/$name.log" 2>&1
    fi
    local rc=$?
    tail -n 5 "$OUT/$name.log"
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" >> "$SUMMARY"
    return $rc
}

pip_install() {  # from WHEELHOUSE when given (offline), else the index
    if [ -n "${WHEELHOUSE:-}" ]; then
        "$PY" -m pip install -q --no-index --find-links "$WHEELHOUSE" "$@"
    else
        "$PY" -m pip install -q "$@"
    fi
}

run_install() {
    if [ "${GPU_BENCH_NO_INSTALL:-0}" = 1 ]; then echo "GPU_BENCH_NO_INSTALL=1: using what is installed"
    else
    pip_install numpy pillow safetensors fsspec pyarrow pydensecrf2 matplotlib || true
    "$PY" -m pip install -q -e . --no-deps || true  # PYTHONPATH covers it if this fails
    fi
    "$PY" -c "import torch, deconvnet.inference; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
}
export -f pip_install run_install
part install 90 run_install

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { [ "${GPU_BENCH_TINY:-0}" = 1 ] || echo "warning: no CUDA device; figures are CPU figures"; }

run_model() {
    for b in $BATCHES; do
        "$PY" bench/model.py --preset "$PRESET" --batch-size "$b" --dtype bf16 --channels-last \
            --iters "$ITERS" --out "$OUT/model.json" || return 1
    done
}
export -f run_model
part model 100 run_model

part segmenter 110 "$PY" bench/segmenter.py --preset "$PRESET" --images "$IMAGES" --max-proposals "$PROPOSALS" \
    --batch-size "$SEG_BATCH" --repeats "$REPEATS" --out "$OUT/segmenter.json"

run_crf() {  # bench/crf_engines.py comes with the torch CRF engine; its flags are read from its --help
    [ -f bench/crf_engines.py ] || { echo "bench/crf_engines.py not in this checkout: skipped"; return 3; }
    local help args=()
    help=$("$PY" bench/crf_engines.py --help) || return 1
    grep -q -- "--device" <<< "$help" && args+=(--device "$CRF_DEVICE")
    if grep -q -- "--output" <<< "$help"; then args+=(--output "$OUT/crf_engines.json")
    elif grep -q -- "--out" <<< "$help"; then args+=(--out "$OUT/crf_engines.json"); fi
    [ "${GPU_BENCH_TINY:-0}" = 1 ] && grep -q -- "--sizes" <<< "$help" && args+=(--sizes 200x150)
    "$PY" bench/crf_engines.py "${args[@]}"
}
export -f run_crf
part crf 90 run_crf

run_pipeline() {
    "$PY" -c "import ray" 2>/dev/null || pip_install "ray[data]==2.60.*" \
        || { echo "Ray cannot be installed here: the segment job is skipped"; return 3; }
    "$PY" bench/pipeline.py --images "$JOB_IMAGES" --preset "$PRESET" --crf none --max-proposals "$PROPOSALS" \
        --batch-size "$SEG_BATCH" --skip-sequential --work "$OUT/pipeline-work" --out "$OUT/pipeline.json"
}
export -f run_pipeline
part pipeline 150 run_pipeline
rm -rf "$OUT/pipeline-work"

"$PY" - "$SUMMARY" "$OUT/summary.json" <<'EOF'
import json, sys
rows = [line.rstrip("\n").split("\t") for line in open(sys.argv[1]) if line.strip()]
meaning = {"0": "ok", "3": "skipped", "124": "timed out"}
summary = {name: {"status": meaning.get(rc, f"failed ({rc})"), "seconds": int(s)} for name, rc, s in rows}
json.dump(summary, open(sys.argv[2], "w"), indent=2)
print(json.dumps(summary, indent=2))
EOF
rm -f "$SUMMARY"
