#!/usr/bin/env bash
# One command for a GPU session (issue 13 item 3): on one GPU, from a cold cache, in <= 8 minutes.
#
#   bash benchmarks/fetch_wheels.sh          # once, on a machine with internet (fills .whl/)
#   bash benchmarks/gpu_suite.sh             # on the GPU machine (carry .whl/ along)
#   bash benchmarks/gpu_suite.sh --dry-run   # CPU: the same steps at tiny sizes (CI: tests/e2e/test_gpu_suite.py)
#
# Steps, each with its own time limit, each logged to $WORK/<step>.log; the suite goes on after a
# failed step and exits non-zero at the end if any failed:
#   versions     Python, torch, triton, CUDA, GPU
#   rank_candidates  benchmarks/rank_candidates.py: every CVMM candidate vs the Triton default,
#                grouped_mm and the dense-active MLP at the 44M and 244M layer shapes, and the
#                moeut_44m training step per candidate vs dense_44m, with profiler kernel tables
#                (<= 8 min; its own Triton cache, so cold_start below stays cold); output in
#                $WORK/rank/ and in the appended section
#   footprint    the Triton kernels x configs moeut_44m bf16 will compile (moeut.tools.footprint)
#   cold_start   first moeut_44m bf16 training step (64 x 1024) with a cold Triton cache, then in a
#                new process with the on-disk caches warm (moeut.tools.warmup); targets 30 s / 5 s
#   pytest_gpu   python -m pytest -m gpu tests/ (golden files in fp32 and bf16 with Triton, KV
#                decoding, gradients vs fp64, torch.compile, autotune disk cache, kernel checks)
#   train        python train.py on CUDA in bf16 (default data config, real text): a few hundred
#                steps with checkpoints, a SIGTERM after the first checkpoint, then a resume
#   evaluate     python -m moeut.evaluate on that run (limit per task): perplexity of the C4 sample
#                carried in data/ always; the zero-shot tasks when their sets are found
#                ($MOEUT_SHARED/data/eval or ../shared/data/eval), else reported as skipped
#   analyze      python -m moeut.analysis routing on that run (capped tokens)
#   bench_*      benchmarks/train_step.py, benchmarks/moe_layer.py, benchmarks/cvmm.py
# and appends one dated markdown section (GPU, versions, step table, figures) to docs/benchmarks.md
# (GPU_SUITE_DOC overrides; the dry run writes to $WORK/benchmarks.md, never docs/benchmarks.md).
#
# Dependencies on a stock GPU image (Python 3.12, torch, triton, numpy, sentencepiece, matplotlib,
# pytest preinstalled; no Hydra): the project's pure-Python dependencies travel as wheels in .whl/
# (git-ignored; benchmarks/fetch_wheels.sh downloads hydra-core, omegaconf,
# antlr4-python3-runtime==4.9.3 and PyYAML for CPython 3.12; packaging comes with pytest with `pip download --no-deps`). This
# script installs them with `pip install --no-index --no-deps --target $WORK/deps .whl/*.whl` and
# puts that folder and the repository on PYTHONPATH. Nothing is fetched from the network.
#
# Environment: GPU_SUITE_DRY_RUN=1 (= --dry-run), GPU_SUITE_DOC (markdown file to append to),
# GPU_SUITE_WORK (work dir; default a new temp dir), GPU_SUITE_WHEELS (default .whl),
# GPU_SUITE_STEPS (comma-separated step names to run, e.g. versions,rank_candidates to fit a short
# GPU lease; the others are recorded as SKIPPED; default: all steps).
set -u
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
DRY="${GPU_SUITE_DRY_RUN:-0}"
[[ "${1:-}" == "--dry-run" ]] && DRY=1
WORK="${GPU_SUITE_WORK:-$(mktemp -d /tmp/gpu_suite.XXXXXX)}"
mkdir -p "$WORK"
if [[ "$DRY" == 1 ]]; then DOC="${GPU_SUITE_DOC:-$WORK/benchmarks.md}"; else DOC="${GPU_SUITE_DOC:-$REPO/docs/benchmarks.md}"; fi
WHEELS="${GPU_SUITE_WHEELS:-$REPO/.whl}"
T_START=$(date +%s)

# Cold caches of our own, so "cold start" means cold and nothing outside $WORK is touched.
export TRITON_CACHE_DIR="$WORK/triton_cache" TORCHINDUCTOR_CACHE_DIR="$WORK/inductor_cache"
export MOEUT_GPU_REPORT="$WORK/gpu_report.jsonl"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg WANDB_MODE=disabled HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 \
       TOKENIZERS_PARALLELISM=false
unset MOEUT_CVMM_BACKEND MOEUT_TRITON_CONFIG MOEUT_CVMM_DETERMINISTIC
: > "$MOEUT_GPU_REPORT"

# --- dependencies -----------------------------------------------------------------------------
DEPS="$WORK/deps"
if ! python -c "import hydra, omegaconf, yaml" 2>/dev/null; then
  if compgen -G "$WHEELS/*.whl" > /dev/null; then
    python -m pip install --quiet --no-index --no-deps --target "$DEPS" "$WHEELS"/*.whl \
      || { echo "gpu_suite: installing the wheels in $WHEELS failed"; exit 2; }
  else
    echo "gpu_suite: hydra/omegaconf are not importable and $WHEELS has no wheels;" \
         "run benchmarks/fetch_wheels.sh on a machine with internet and carry .whl/ along"; exit 2
  fi
fi
export PYTHONPATH="$DEPS:$REPO${PYTHONPATH:+:$PYTHONPATH}"
set -f  # from here on: no globbing of arguments such as tasks=[lambada,piqa]

if [[ "$DRY" == 1 ]]; then
  export CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=0
  DEV=cpu; PREC=fp32; PRESET=tiny; FP_ARGS="preset=tiny dtype=fp32 batch=2 seq_len=32 prefill=8"
  WARM_ARGS="preset=tiny dtype=fp32 batch=2 seq_len=32 prefill=8 steps=1 device=cpu"
  PYTEST_TARGETS="tests/unit/kernels/test_gpu_cuda.py tests/unit/kernels/test_cvmm_triton.py"
  TRAIN_ARGS="model=tiny data.vocab_size=512 data.seq_len=32 data.valid_tokens=2048 data.tokenizer_chars=300000 train.device=cpu train.precision=fp32 train.steps=60 train.batch_size=4 train.save_interval=10 train.val_interval=30 train.log_interval=10 train.routing_interval=20"
  EVAL_ARGS="tasks=[perplexity,lambada,piqa] perplexity.path=$REPO/data/c4_sample/valid.jsonl.gz limit=4 device=cpu batch_size=4 pad_multiple=8"
  ANALYZE_ARGS="seq_len=32 max_tokens=2048 batch_size=8 device=cpu store_positions=256"
  BENCH_TS="--device cpu --moeut tiny --dense dense_tiny --batch 2 --seq-len 32 --rounds 1 --warmup 1"
  BENCH_LAYER="--device cpu --shapes small --rounds 1"
  BENCH_CVMM="--device cpu --small --tokens 128 --skip-layer"
  RANK_ARGS="--dry-run --budget-s 20"
  LIMIT_SCALE=1
else
  DEV=cuda; PREC=bf16; PRESET=moeut_44m; FP_ARGS="preset=moeut_44m dtype=bf16"
  WARM_ARGS="preset=moeut_44m dtype=bf16 batch=64 seq_len=1024 steps=2"
  PYTEST_TARGETS="tests/"
  TRAIN_ARGS="model=moeut_44m train.device=cuda train.precision=bf16 train.steps=300 train.batch_size=32 data.seq_len=256 train.save_interval=100 train.val_interval=150 train.log_interval=25 train.routing_interval=100"
  EVAL_ARGS="tasks=[perplexity,lambada,piqa,arc_easy] perplexity.path=$REPO/data/c4_sample/valid.jsonl.gz limit=50"
  ANALYZE_ARGS="seq_len=256 max_tokens=65536"
  BENCH_TS="--device cuda --rounds 5 --warmup 2"
  BENCH_LAYER="--rounds 5"
  BENCH_CVMM="--tokens 8192"
  RANK_ARGS="--budget-s 420"
  LIMIT_SCALE=1
fi

STEPS_TSV="$WORK/steps.tsv"; : > "$STEPS_TSV"
FAILED=0
# run_step NAME LIMIT_SECONDS CMD...: log to $WORK/NAME.log, record status and seconds
STEPS_ONLY="${GPU_SUITE_STEPS:-}"
run_step() {
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  if [[ -n "$STEPS_ONLY" && ",$STEPS_ONLY," != *",$name,"* ]]; then
    printf '%s\t%s\t%s\n' "$name" "SKIPPED" 0 >> "$STEPS_TSV"
    echo "=== [$name] SKIPPED (not in GPU_SUITE_STEPS=$STEPS_ONLY)"
    return
  fi
  echo "=== [$name] $* (limit ${limit}s)"
  timeout --signal=TERM --kill-after=10 "$limit" "$@" > "$WORK/$name.log" 2>&1
  local rc=$? status=PASS
  if [[ $rc == 124 || $rc == 137 ]]; then status="TIMEOUT"; elif [[ $rc != 0 ]]; then status="FAIL(rc=$rc)"; fi
  [[ $status != PASS ]] && FAILED=1
  printf '%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - t0 ))" >> "$STEPS_TSV"
  tail -n 15 "$WORK/$name.log"
  echo "=== [$name] $status in $(( $(date +%s) - t0 )) s"
}

versions() {
  python - <<'EOF'
import platform, sys, torch
try:
    import triton; tv = triton.__version__
except Exception as e:  # noqa: BLE001
    tv = f"not importable ({e})"
print(f"python {platform.python_version()}; torch {torch.__version__}; triton {tv}; CUDA {torch.version.cuda}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs")
else:
    print("GPU none (CPU dry run)")
EOF
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || true
}

cold_start() {
  # First process: cold Triton cache (compile + autotune). Second: warm on-disk caches.
  python -m moeut.tools.warmup $WARM_ARGS decode=true && python -m moeut.tools.warmup $WARM_ARGS decode=true
}

train_sigterm_resume() {
  local run="$WORK/run" first_ckpt
  mkdir -p "$run"
  python train.py $TRAIN_ARGS hydra.run.dir="$run" > "$WORK/train_first.log" 2>&1 &
  local pid=$!
  for _ in $(seq 1 1200); do  # up to 240 s for the first checkpoint
    first_ckpt=$(ls -d "$run"/checkpoints/step_* 2>/dev/null | grep -v '\.tmp$' | head -n 1)
    [[ -n "$first_ckpt" ]] && break
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.2
  done
  if [[ -z "${first_ckpt:-}" ]]; then echo "no checkpoint appeared"; cat "$WORK/train_first.log"; kill "$pid" 2>/dev/null; return 1; fi
  kill -TERM "$pid" 2>/dev/null
  wait "$pid"; local rc=$?
  tail -n 5 "$WORK/train_first.log"
  local at_signal; at_signal=$(ls -d "$run"/checkpoints/step_* | grep -v '\.tmp$' | sort | tail -n 1)
  echo "SIGTERM after $first_ckpt: exit code $rc, newest checkpoint $(basename "$at_signal")"
  [[ $rc == 0 ]] || { echo "train.py did not exit cleanly on SIGTERM"; return 1; }
  [[ "$(basename "$at_signal")" != "$LAST_CKPT" ]] || { echo "the run finished before the SIGTERM: not a resume test"; return 1; }
  python train.py $TRAIN_ARGS hydra.run.dir="$run" > "$WORK/train_resume.log" 2>&1
  # the resume line comes before the config dump, so show it apart from the log's tail
  grep -m1 "resumed from" "$WORK/train_resume.log" || { echo "the second run did not resume"; return 1; }
  tail -n 20 "$WORK/train_resume.log"
  [[ -d "$run/checkpoints/$LAST_CKPT" ]] || { echo "no final checkpoint $LAST_CKPT"; return 1; }
}

TRAIN_ARGS="$TRAIN_ARGS data.cache_dir=$WORK/data_cache"  # tokenised data stays in the work dir
LAST_CKPT=$(printf 'step_%07d' "$(sed -E 's/.*train\.steps=([0-9]+).*/\1/' <<< "$TRAIN_ARGS")")
export REPO WORK DEV PREC WARM_ARGS TRAIN_ARGS LAST_CKPT
export -f versions cold_start train_sigterm_resume
run_step versions 60 bash -c versions
# Its own Triton cache: the cold_start step below must still find a cold one.
run_step rank_candidates 480 env TRITON_CACHE_DIR="$WORK/triton_cache_rank" \
  python benchmarks/rank_candidates.py $RANK_ARGS --out "$WORK/rank"
run_step footprint 120 python -m moeut.tools.footprint $FP_ARGS
run_step cold_start 180 bash -c cold_start
run_step pytest_gpu 300 python -m pytest -m gpu -q -rA -p no:cacheprovider $PYTEST_TARGETS
run_step train 300 bash -c train_sigterm_resume
run_step evaluate 150 python -m moeut.evaluate checkpoint="$WORK/run" $EVAL_ARGS out_dir="$WORK/eval"
run_step analyze 150 python -m moeut.analysis routing checkpoint="$WORK/run" $ANALYZE_ARGS out_dir="$WORK/analysis"
run_step bench_train_step 200 python benchmarks/train_step.py $BENCH_TS --record "$WORK/bench_train_step.md"
run_step bench_moe_layer 120 python benchmarks/moe_layer.py $BENCH_LAYER
run_step bench_cvmm 150 python benchmarks/cvmm.py $BENCH_CVMM --record "$WORK/bench_cvmm.md"

TOTAL=$(( $(date +%s) - T_START ))
python benchmarks/gpu_suite_report.py --work "$WORK" --doc "$DOC" --total-seconds "$TOTAL" --dry-run "$DRY"
echo "gpu_suite: $( [[ $FAILED == 0 ]] && echo all steps passed || echo SOME STEPS FAILED ) in ${TOTAL} s;" \
     "section appended to $DOC; logs in $WORK"
exit $FAILED
