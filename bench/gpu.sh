#!/bin/bash
# One GPU session: Forge and the peer systems on one model shape, same batch, each run in its own process.
# Through the device tool, from the repository root:
#   bash bench/gpu.sh llama8b "forge:16:offload forge-auto:16:auto hf:16 liger:16 unsloth:16 forge:4:offload hf:4 unsloth:4"
# A run is SYSTEM:BITS[:CHECKPOINTING]; forge* runs use bench/speed.py, the others the peers' recipe.
# Carried folders: .whl (bash ../shared/bench-peers/fetch-wheels.sh .whl), .peers (cp -r ../shared/bench-peers
# .peers) and .gpu/py (Forge's pure-Python dependencies as Python 3.12 wheels).
# Env: SEQ (2048), BS (2), STEPS (6), PER_RUN_S (170), OUT ($OUT or /tmp/out), PROFILE and TRACE (forge runs:
# top kernels in the result; the profiled step's chrome trace in OUT), LONGEST (runs for bench/longest.py, first:
# the longest sequence at batch 1 within CAP_GIB, default 24, LONGEST_ARGS passed on; RUNS may then be "").
# Writes OUT/results.jsonl, OUT/<date>-<device>.json and .md (bench/report.py), and one log per run.
set -u
SHAPE=$1; RUNS=$2
SEQ=${SEQ:-2048}; BS=${BS:-2}; STEPS=${STEPS:-6}; OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /tmp/site
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 UNSLOTH_DISABLE_STATISTICS=1
if [ ! -e /tmp/site/.ready ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl .gpu/py/*.whl 2>&1 | tail -2
  tar xzf .whl/site.tgz -C /tmp/site
  touch /tmp/site/.ready
fi
rm -rf /tmp/site/forge /tmp/site/forge_llm-*.dist-info  # this checkout's Forge on every call (a warm machine keeps the last)
python3 -m pip install -q --no-deps --no-build-isolation --no-compile --target /tmp/site . 2>&1 | grep -v "already exists" | tail -2
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
M=/tmp/model-$SHAPE
# The peers' own recipe makes the shapes it knows (their runs were measured on those); bench/speed.py the others.
if [ ! -d "$M" ]; then
  case $SHAPE in
    llama8b|llama1b) python3 .peers/peers_bench.py make --shape "$SHAPE" --out "$M" 2>&1 | tail -1 ;;
    *) python3 bench/speed.py make --shape "$SHAPE" --out "$M" 2>&1 | tail -1 ;;
  esac
fi
if [ -n "${LONGEST:-}" ]; then
  python3 bench/longest.py --model "$M" --cap-gib "${CAP_GIB:-24}" --out "$OUT" ${LONGEST_ARGS:-} "$LONGEST" 2>&1 \
    | tee "$OUT/longest.txt" | grep --line-buffered -v "^RESULT"  # each try as it ends (a call cut short keeps them)
  grep "^RESULT" "$OUT/longest.txt" | python3 bench/report.py --tag-shape "$SHAPE" | tee -a "$OUT/results.jsonl"
fi
for r in $RUNS; do
  IFS=: read -r system bits ckpt <<< "$r"
  log="$OUT/log-$SHAPE-$SEQ-$system-$bits${ckpt:+-$ckpt}.txt"
  echo "== $r (bs $BS, seq $SEQ)"
  if [[ $system == forge* ]]; then
    timeout "${PER_RUN_S:-170}" python3 bench/speed.py run --model "$M" --system "$system" --bits "$bits" \
      --checkpointing "${ckpt:-auto}" --bs "$BS" --seq "$SEQ" --steps "$STEPS" ${PROFILE:+--profile} ${TRACE:+--trace "$OUT/trace-$system-$bits.json"} > "$log" 2>&1
  else
    timeout "${PER_RUN_S:-170}" python3 .peers/peers_bench.py run --model "$M" --system "$system" --bits "$bits" \
      --bs "$BS" --seq "$SEQ" --steps "$STEPS" --warmup 2 > "$log" 2>&1
  fi
  echo "rc=$?"
  if grep -q RESULT "$log"; then
    grep RESULT "$log" | python3 bench/report.py --tag-shape "$SHAPE" | tee -a "$OUT/results.jsonl"
  else
    tail -5 "$log"
  fi
done
python3 bench/report.py "$OUT/results.jsonl" --out "$OUT"
