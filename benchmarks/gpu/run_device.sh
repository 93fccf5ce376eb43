#!/usr/bin/env bash
# The CUDA tests and benchmarks in one go, on a bare GPU machine that has torch but not all of
# our dependencies. Run from the repository root:
#
#   bash benchmarks/gpu/run_device.sh [SECONDS] [SECTIONS]   # default 450 s: the whole run's time box
#
# SECTIONS (default all, in this order): tests input engine photometric e2e unit
#   tests        pytest -m gpu tests/gpu tests/unit (the CUDA tier)
#   input        bench_input_pipeline.py: seerlike train images/s vs the compute-only step and the
#                data-wait fraction, SwAV / BYOL ResNet-50, bf16 channels_last, synthesised JPEGs,
#                photometric ops on the GPU vs on the host CPU (results.md / results.json in $OUT/input)
#   engine       bench_engine.py --cuda;  photometric  bench_photometric_cuda.py
#   e2e          seerlike train swav_resnet50 on cifar10-dev;  unit  the CPU unit tests on this machine
#
# Expects our missing dependencies as wheels in .whl/ (simplejpeg, webdataset, braceexpand,
# faiss-cpu, submitit; torch is NOT installed: the machine's own build is used, and the
# package is run from the tree through PYTHONPATH rather than installed, so that our
# torch pin is not pulled in) and, if ../shared/data is missing, a copy of cifar10-dev in
# .devdata/. Logs and the tests' junit XML go to $OUT (default /tmp/seerlike-gpu).
set -uo pipefail
END=$((SECONDS + ${1:-450}))
SECTIONS=" ${2:-tests input engine photometric e2e unit} "
want() { [[ "$SECTIONS" == *" $1 "* ]]; }
OUT=${OUT:-/tmp/seerlike-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

left() {  # seconds left for a stage: its cap, or what remains of the time box
    local r=$((END - SECONDS))
    (( r < $1 )) && echo $((r > 5 ? r : 5)) || echo "$1"
}

if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ ! -e ../shared/data ] && [ -d .devdata ]; then
    mkdir -p ../shared && ln -s "$PWD/.devdata" ../shared/data
fi

{
    date -u
    nvidia-smi
    python3 -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda,
                'cudnn', torch.backends.cudnn.version(), torch.cuda.get_device_name(), 'TF32 conv', torch.backends.cudnn.allow_tf32,
                'TF32 matmul', torch.backends.cuda.matmul.allow_tf32)"
    python3 -c "import torchvision, timm; print('torchvision', torchvision.__version__, 'timm', timm.__version__)"
    nproc
} 2>&1 | tee "$OUT/env.log"

if want tests; then
    echo "== CUDA tests" | tee "$OUT/tests_gpu.log"
    timeout -k 10 "$(left 220)" python3 -m pytest -q -m gpu tests/gpu tests/unit -p no:cacheprovider \
        -o junit_family=xunit1 --junitxml="$OUT/tests_gpu.xml" 2>&1 | tee -a "$OUT/tests_gpu.log"
fi

if want input; then
    # 2 methods x 3 runs (compute only, photometric on the GPU, photometric on the host), each a fresh
    # process (estimated 20-30 s apiece on an H100 with 60 steps: not yet run); workers = cores - 2
    echo "== bench_input_pipeline" | tee "$OUT/input.log"
    mkdir -p "$OUT/input"
    timeout -k 10 "$(left 200)" python3 benchmarks/gpu/bench_input_pipeline.py --out "$OUT/input" --timeout 60 \
        2>&1 | tee -a "$OUT/input.log"
fi

if want engine; then
    echo "== bench_engine --cuda" | tee "$OUT/bench_engine.log"
    timeout -k 10 "$(left 150)" python3 benchmarks/bench_engine.py --cuda 2>&1 | tee -a "$OUT/bench_engine.log"
fi
if want photometric; then
    echo "== bench_photometric_cuda" | tee "$OUT/bench_photometric.log"
    timeout -k 10 "$(left 60)" python3 benchmarks/bench_photometric_cuda.py 2>&1 | tee -a "$OUT/bench_photometric.log"
fi

if want e2e; then
    # the paper recipe end to end (DDP world 1 = plain module, fp16 + loss scaler, 2x224 + 6x96 crops)
    # on the CIFAR-dev images: 32 px sources, so decoding is cheap and the crops are upsampled
    echo "== seerlike train --recipe swav_resnet50, 40 steps" | tee "$OUT/e2e.log"
    RUN=$(mktemp -d)
    timeout -k 10 "$(left 90)" python3 -m seerlike train --recipe swav_resnet50 --data ../shared/data/cifar10-dev/train \
        --run-dir "$RUN" --nproc 1 --max-steps 40 optim.warmup_steps=0 data.num_workers=12 loop.log_every=10 \
        loop.progress=false loop.tensorboard=false checkpoint.every_steps=1000 2>&1 | tail -5 | tee -a "$OUT/e2e.log"
    cat "$RUN/metrics.jsonl" | tee -a "$OUT/e2e.log"
fi

if want unit; then
    echo "== unit tests on the GPU machine" | tee "$OUT/tests_unit.log"
    timeout -k 10 "$(left 600)" python3 -m pytest -q -n 8 -m "not gpu" tests/unit -p no:cacheprovider \
        >>"$OUT/tests_unit.log" 2>&1
    tail -40 "$OUT/tests_unit.log"
fi

echo "done in $SECONDS s"
