#!/usr/bin/env bash
# Run benchmarks/bench_end_to_end.py as parallel streams, one per (model, seed), each pinned to
# its own physical core (one logical CPU per core, from `lscpu -p`), ONNX Runtime with 1 thread.
# Every stream measures its own latency table, predictor and paired ratios on its own core, so a
# stream's ratios compare models timed on the same core; fine-tuning and the search proxy run on
# TRAIN_DEVICE (e.g. cuda) so that the CPU cores do the latency work only.
#
#   benchmarks/e2e_streams.sh WORK TIMEOUT_S [TRAIN_DEVICE] [MODELS] [SEEDS]
#   REGIMES=hard benchmarks/e2e_streams.sh ...     # only the hard regime
#
# Each stream runs the standard regime (budgets 0.7,0.5,0.35,0.2 of dense latency, 3 epochs)
# and the hard regime (0.2, 1 epoch), appending rows to WORK/results_<model>_s<seed>.csv; a
# rerun skips rows already there. Summarise with
#   python benchmarks/bench_end_to_end.py --summarize --out "$(ls WORK/results_*.csv | paste -sd,)"
set -u
WORK=${1:?work dir}; TIMEOUT=${2:?timeout in s}; DEV=${3:-cpu}
MODELS=${4:-conv1d,resnet18,mobilenet_v2}; SEEDS=${5:-0,1,2}
PY=${PYTHON:-python3}; REGIMES=${REGIMES:-hard,standard}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONUNBUFFERED=1
mkdir -p "$WORK"
END=$(( $(date +%s) + TIMEOUT ))
left() { echo $(( END - $(date +%s) > 1 ? END - $(date +%s) : 1 )); }
# one logical CPU per physical core (skip SMT siblings)
mapfile -t CPUS < <(lscpu -p=CPU,CORE,SOCKET | grep -v '^#' | sort -t, -k3,3n -k2,2n -u | cut -d, -f1)
i=0
for m in ${MODELS//,/ }; do
  for s in ${SEEDS//,/ }; do
    cpu=${CPUS[$((i % ${#CPUS[@]}))]}; i=$((i + 1))
    w="$WORK/work_${m}_s${s}"; out="$WORK/results_${m}_s${s}.csv"; mkdir -p "$w"
    (
      common=(--models "$m" --seeds "$s" --work "$w" --tables-root "$w/latency_tables" --out "$out"
              --train-device "$DEV" --n-trials 16 --bisect-iters 5 --dense-epochs 6
              --methods autoprune_ftproxy,uniform16,tp_global,autoprune)
      [[ $REGIMES == *hard* ]] && timeout "$(left)" taskset -c "$cpu" "$PY" \
        benchmarks/bench_end_to_end.py "${common[@]}" --budgets 0.2 --epochs 1
      [[ $REGIMES == *standard* ]] && timeout "$(left)" taskset -c "$cpu" "$PY" \
        benchmarks/bench_end_to_end.py "${common[@]}" --budgets 0.7,0.5,0.35,0.2 --epochs 3
    ) >"$WORK/log_${m}_s${s}.txt" 2>&1 &
  done
done
wait
