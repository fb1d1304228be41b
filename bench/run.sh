#!/usr/bin/env bash
# Throughput benchmarks, each a ratio measured side by side in one run.
#
#   bench/run.sh [--quick] [SCENARIO ...]
#
# Scenarios (all by default): e2e sim_check gen realloc interstage schedule fused_train
# scaling plan sim peer vllm_sync (sim_check needs e2e's result; peer needs
# `make bench-peer-env`, vllm_sync `make install-vllm`). --quick shrinks every scenario
# (whole run under ~5 minutes on a 2-core machine). Results: bench/results/<scenario>.json,
# then bench/results/latest.json, latest.md and PNG plots beside them (bench/report.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
FUSEDRL=${FUSEDRL:-.venv/bin/fusedrl}
OUT=bench/results
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled TOKENIZERS_PARALLELISM=false

QUICK=0
SCENARIOS=()
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK=1 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) SCENARIOS+=("$arg") ;;
  esac
done
ALL=(e2e sim_check gen realloc interstage schedule fused_train scaling plan sim peer vllm_sync)
[ ${#SCENARIOS[@]} -eq 0 ] && SCENARIOS=("${ALL[@]}")

if "$PY" -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  DEVICE=gpu
else
  DEVICE=cpu
fi
echo "device: $DEVICE, quick: $QUICK, scenarios: ${SCENARIOS[*]}"

q() { if [ "$QUICK" = 1 ]; then echo "$1"; else echo "$2"; fi; }

# One scenario's command(s). Called from an `if`, where bash ignores `set -e`, so every
# command of a multi-command scenario ends in `|| return`.
scenario_cmd() {
  local name=$1
  case "$name" in
    e2e)
      # Variants alternated round-robin; --quick: a smaller batch and tail, 2 measured
      # rounds, and the prediction from the calibrated kernels alone.
      if [ "$QUICK" = 1 ]; then
        "$PY" bench/e2e.py --iterations 2 --batch 16 --mini-batch 16 --lengths lognormal:8,128 \
          --max-new-tokens 256 --overheads none --out "$OUT/e2e.json"
      else
        "$PY" bench/e2e.py --iterations 5 --out "$OUT/e2e.json"
      fi ;;
    gen)
      "$PY" bench/gen_bench.py --models "$(q tiny tiny,smollm2)" --rounds "$(q 1 3)" \
        --out "$OUT/gen.json" ;;
    realloc)
      "$PY" bench/realloc_bench.py --model "$(q small base100m)" --repeats "$(q 1 3)" \
        --out "$OUT/realloc.json" ;;
    interstage)
      "$FUSEDRL" bench interstage --devices 2 --lengths "$(q lognormal:8,64 lognormal:16,160)" \
        --json > "$OUT/interstage.json" ;;
    schedule)
      if [ "$QUICK" = 1 ]; then
        "$PY" bench/schedule_quality.py --time-limit 5 --only 8x1x16,8x2x16 --out "$OUT/schedule.json"
      else
        "$PY" bench/schedule_quality.py --time-limit 20 --out "$OUT/schedule.json"
      fi ;;
    fused_train)
      "$PY" bench/fused_train.py --reps "$(q 2 5)" --json "$OUT/fused_train.json" ;;
    scaling)
      "$PY" bench/scaling.py --iterations "$(q 2 4)" --json "$OUT/scaling.json" ;;
    plan)
      "$PY" bench/plan_bench.py --time-limit "$(q 3 15)" \
        --cases "$(q realhf-7b-16 realhf-7b-16,realhf-13b-32,realhf-33b-64,realhf-70b-128,rlhfuse-13b-64,rlhfuse-33b-128,rlhfuse-65b-256)" \
        --out "$OUT/plan.json" ;;
    sim_check)
      "$PY" bench/sim_check.py --e2e "$OUT/e2e.json" --out "$OUT/sim_check.json" ;;
    sim)
      # RLHFuse's settings (13B/33B/65B pairs on 256 GPUs) next to its published ranges.
      for m in 13b 33b 65b; do
        "$FUSEDRL" simulate --config "configs/rlhfuse-$m.yaml" --json > "$OUT/sim-$m.json" || return
      done
      "$PY" -c 'import json, sys; out, files = sys.argv[1], sys.argv[2:]; json.dump({f.split("sim-")[1][:-5]: {"simulated_speedups": json.load(open(f))["speedups"], "rlhfuse_reported": json.load(open(f))["rlhfuse_reported"]} for f in files}, open(out, "w"), indent=2)' \
        "$OUT/sim.json" "$OUT"/sim-13b.json "$OUT"/sim-33b.json "$OUT"/sim-65b.json ;;
    peer)
      # The natural workload (responses end at EOS): TRL's defaults vs fusedrl's `all`.
      "$PY" bench/peer_trl.py --workload natural --iterations "$(q 1 2)" \
        --batch "$(q 8 16)" --response-length "$(q 128 192)" --out "$OUT/peer.json" ;;
    vllm_sync)
      if [ -x .venv-vllm/bin/python ]; then
        VLLM_CPU_OMP_THREADS_BIND=nobind VLLM_ENABLE_V1_MULTIPROCESSING=0 \
          .venv-vllm/bin/python bench/vllm_sync.py --model "$(q '' pkg:smollm2-135m-instruct)" \
          --repeats "$(q 1 3)" --out "$OUT/vllm_sync.json"
      else
        echo '{"skipped": ".venv-vllm is missing: run make install-vllm"}' > "$OUT/vllm_sync.json"
      fi ;;
    *)
      echo "unknown scenario '$name' (known: ${ALL[*]})" >&2; return 2 ;;
  esac
}

run_scenario() {
  local name=$1 start=$SECONDS rc=0
  echo "== $name"
  scenario_cmd "$name" || rc=$?
  echo "   $name took $((SECONDS - start)) s (exit $rc)"
  return $rc
}

FAILED=()
for s in "${SCENARIOS[@]}"; do
  if ! run_scenario "$s"; then
    FAILED+=("$s")
    echo "   $s FAILED" >&2
  fi
done
"$PY" bench/report.py --results "$OUT" --device "$DEVICE"
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "failed scenarios: ${FAILED[*]}" >&2
  exit 1
fi
