#!/bin/bash
# Recipe sweep at fixed step counts: per variant `seerlike train` then kNN on cifar10-dev val,
# P variants at a time. This is how tiny_byol and distill_tiny's LR were chosen (docs/benchmarks.md).
#
#   bash benchmarks/sweep_learning.sh benchmarks/sweeps/byol_round2.txt
#
# Variant lines: name|recipe|steps|key=value overrides. Environment:
#   P       variants at once (default 8; each takes NPROC ranks x OMPN threads + data workers)
#   NPROC   ranks per variant (default 2, the 2-core CPU path); OMPN threads per rank (default 1)
#   GPU=1   use CUDA (default: CPU only); EXTRA overrides for every variant (given before the line's)
#   OUT     results.txt and each variant's metrics.jsonl (default /tmp/sweep/out)
#   SEED    loop.seed of every variant (default 0; a second seed checks a lever that won)
#   WHEELS=1  install .whl/*.whl into /tmp/site first (a bare GPU machine, benchmarks/gpu/run_device.sh)
#   TEACHER replaces @TEACHER@ in the overrides (distillation variants: a ClusterFit run dir,
#           e.g. RUN/clusterfit of `benchmarks/bench_learning.py`)
#   LABELS  replaces @LABELS@ (ClusterFit variants: a `seerlike cluster` output folder, e.g. RUN/cluster)
#   HELDOUT a path,label CSV scored too (e.g. RUN_ROOT/heldout/heldout_10000.csv written by
#           `bench_learning.py --heldout 10000`): the figure to choose by, val has 1,000 images
# Data: ../shared/data/cifar10-dev, or .devdata/ (a copy, for machines without ../shared).
set -u
export OMP_NUM_THREADS=${OMPN:-1} NPROC=${NPROC:-2} EXTRA=${EXTRA:-} PYTHONUNBUFFERED=1
export W=/tmp/sweep OUT=${OUT:-/tmp/sweep/out} PYTHONPATH=/tmp/site:$PWD
[ -n "${GPU:-}" ] || export CUDA_VISIBLE_DEVICES=
[ -z "${WHEELS:-}" ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
CIFAR=../shared/data/cifar10-dev; [ -d $CIFAR ] || CIFAR=.devdata/cifar10-dev
export CIFAR=$(cd $CIFAR && pwd)
mkdir -p $W/runs $OUT
seer() { python3 -c 'from seerlike.cli import main; import sys; sys.exit(main(sys.argv[1:]))' "$@"; }
knn() {  # MODEL OUT_DIR [VAL_CSV]: the quickstart's kNN (seerlike.quickstart.knn_args)
  python3 -c 'import sys; from seerlike.cli import main; from seerlike.quickstart import knn_args
sys.exit(main(["eval", *knn_args(*sys.argv[1:])]))' "$1" $CIFAR/train.csv "${3:-$CIFAR/val.csv}" "$2"
}
top1() { python3 -c "import json; print(json.load(open('$1/eval_knn.json'))['metrics']['top1'])"; }
export -f seer knn top1
[ -e $W/ds/summary.json ] || seer ingest $CIFAR/train --out $W/ds --no-progress shard_max_samples=200 > $OUT/ingest.log 2>&1 \
    || { cat $OUT/ingest.log; exit 1; }
one() {
  IFS='|' read -r name recipe steps ov <<< "$1"
  ov=${ov//@TEACHER@/${TEACHER:-}}; ov=${ov//@LABELS@/${LABELS:-}}
  d=$W/runs/$name; rm -rf $d; mkdir -p $d
  t0=$(date +%s)
  seer train --recipe $recipe --data $W/ds --run-dir $d/train --nproc $NPROC --max-steps $steps $EXTRA $ov loop.seed=${SEED:-0} \
      optim.warmup_steps=$((steps / 20)) checkpoint.every_steps=100000 loop.tensorboard=false loop.log_every=20 > $d/train.log 2>&1 \
      || { echo "FAILED $name"; grep -A12 Traceback $d/train.log | head -30; return; }
  t1=$(date +%s)
  knn $d/train $d/eval > $d/eval.log 2>&1
  held=""
  if [ -n "${HELDOUT:-}" ]; then knn $d/train $d/heldout "$HELDOUT" > $d/heldout.log 2>&1; held=" top1_heldout=$(top1 $d/heldout)"; fi
  st=$(python3 -c "import json, statistics; r=[json.loads(l) for l in open('$d/train/metrics.jsonl')]; print(round(statistics.median(x['step_time_s'] for x in (r[2:] or r)), 3))")
  echo "RESULT $name steps=$steps train_s=$((t1 - t0)) median_step_s=$st top1=$(top1 $d/eval)$held" | tee -a $OUT/results.txt
  cp $d/train/metrics.jsonl $OUT/$name.jsonl
}
export -f one
[ -e $W/rand/eval_knn.json ] || knn random:resnet10_cifar $W/rand > $OUT/rand.log 2>&1
echo "RANDOM top1=$(top1 $W/rand)" | tee -a $OUT/results.txt
# one line = one argument, quotes kept (JSON-valued overrides)
grep -v '^#' "$1" | grep . | xargs -d '\n' -P ${P:-8} -n 1 bash -c 'one "$1"' _
