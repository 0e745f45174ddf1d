#!/usr/bin/env bash
# The GPU tier of verification (DESIGN.md section 6) in one command: build the CUDA extension,
# run the `gpu` tests (bf16 included), benchmark the models and every op, and write
# bench/results/<YYYY-MM-DD>-<gpu-slug>.{json,md}. Needs no download.
#
#   bash bench/gpu_check.sh [DIR]     # DIR: also copy the results there, and all logs as logs.txt
#   DEIT_FAST_COMMIT=$(git rev-parse --short HEAD) ...  # name the commit when the copy's .git is stale
#   GPU_CHECK_PARTS=tests,ops ...     # only these parts (default tests,demo,ops,models; opt-in: tune,
#                                     # profile, pending)
#   GPU_CHECK_DEADLINE=400 ...        # seconds for the whole run (default 550)
#
# Each step has a cap in seconds and all share the deadline, so the whole run stays under
# 10 minutes on one H100/H200 (one device call). Split over two calls (tests,ops then models)
# every step gets its full cap, and the second call, on the still-warm machine, reuses the build. A part that reaches its cap is killed and reported as a timeout (the
# benches stream their rows, so what they measured is kept); inside their caps the benches stop
# starting new cases (--time-budget) and list the cases they did not run. Parts in order of value:
#   1. install (sm_90 only) in the background while the Triton `gpu` tests run (they need no
#      extension; pytest-xdist spreads their compiles over the cores where it imports), then the
#      CUDA-extension `gpu` tests (tests/ops/*_cuda.py, compute-sanitizer runs included); part
#      `demo`: the host overhead per op call (bench/overhead.py, in the logs only) and per
#      Triton launch (bench/launch_cost.py), then `deit-fast demo` cut to a few epochs on the GPU;
#   2. every bench/ops/*.py at its default GPU shapes and dtypes (attention first): their cases
#      run dtype-major, so the first dtype is covered first (torch.compile's static-shape compile
#      per case is most of the time);
#   3. models, ours vs timm eager, short repetitions (--quick): a representative subset, every
#      DeiT size at 224, DeiT-B at 384, CaiT XXS/S at 224 and 384, CaiT-M36 at 384; then
#      DeiT-Ti's step under torch.profiler, ours and timm (bench/profile.py, in the logs);
#   4. whole training steps (bench/train.py): DeiT-S and CaiT-XXS24, ours vs timm eager, without
#      distillation and hard-distilled from RegNetY-16GF in channels-last and NCHW;
#   5. DeiT-S hard-distilled with the teacher compiled, weights frozen (--compile-teacher) against
#      eager; then ours and timm under torch.compile (a minute or more each) for DeiT-S, then
#      CaiT-XXS24 if time is left.
# On the GPU every bench row is also timed replayed from a CUDA graph (bench/common.py): the
# GPU's time without the host's.
# Full runs: `python -m bench.models`, `python -m bench.train` and `python -m bench.ops.<op>`.
set -uo pipefail  # not -e: a failing part is reported and the next one still runs
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
copy_to=${1:-}
work=$(mktemp -d)
steps=$work/steps.tsv
: >"$steps"
deadline=$((SECONDS + ${GPU_CHECK_DEADLINE:-550}))
parts=",${GPU_CHECK_PARTS:-tests,demo,ops,models},"
want() { [[ $parts == *",$1,"* ]]; }  # want PART: whether this run includes it
export PIP_NO_INDEX=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1  # no download, ever

budget() {  # budget CAP: CAP, or less when the shared deadline is nearer
  local left=$((deadline - SECONDS))
  echo $((left < $1 ? left : $1))
}

step() {  # step NAME CAP CMD...: run CMD for at most CAP seconds, log to $work/NAME.log
  local name=$1 cap=$2 start=$SECONDS rc
  shift 2
  if ((cap < 30)); then
    printf '%s\tskipped\t0\t\n' "$name" >>"$steps"
    echo "== $name: skipped, the deadline is near"
    return
  fi
  echo "== $name (at most ${cap}s)"
  timeout --kill-after=5 "$cap" "$@" >"$work/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" "$work/$name.log" >>"$steps"
  tail -n 3 "$work/$name.log"
}

# sm_90 only: half the compile time of the default 8.0;9.0. A failed CUDA build fails the step
# (DEIT_FAST_BUILD_CUDA=1); the rest still runs from the source tree, without the cuda backend.
# A second call on the same (warm) machine skips it when the sources it built are unchanged: the
# stamp holds their hash (mtimes change with every copy of the tree).
stamp=deit_fast/.cuda_build_stamp  # ignored by git, like the .so beside it
sources=$(cat setup.py csrc/* | sha256sum | cut -d' ' -f1)
if [[ -f $stamp && $(cat "$stamp") == "$sources" ]] && ls deit_fast/_C*.so >/dev/null 2>&1; then
  printf 'install\tskipped\t0\t\n' >>"$steps"
  echo "== install: skipped, deit_fast._C was built from these sources"
  installing=
elif ! want tests && ! want ops && ! want models && ! want profile && ! want pending; then  # tune alone: Triton only
  installing=
else
  rm -f "$stamp"
  { step install "$(budget 170)" env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=8 DEIT_FAST_BUILD_CUDA=1 \
      "$PY" -m pip install --no-deps --no-build-isolation -e . &&
    awk -F'\t' '$1 == "install" && $2 == "0" {ok = 1} END {exit !ok}' "$steps" &&
    echo "$sources" >"$stamp"; } &
  installing=$!
fi

xdist=()
"$PY" -c "import xdist" 2>/dev/null && xdist=(-n 6)
jsonl=()  # the benches' row files, for the report
pytest_gpu() {  # pytest_gpu NAME CAP ARGS...: the `gpu` tests among ARGS, junit to $work/NAME.xml
  local name=$1 cap=$2
  shift 2
  step "$name" "$cap" "$PY" -m pytest -m gpu -q -ra --tb=short -p no:cacheprovider "${xdist[@]}" \
    --junitxml="$work/$name.xml" "$@"
}
want tests && pytest_gpu pytest_gpu_triton "$(budget 160)" tests --ignore-glob='*_cuda.py'
# The pending part's Triton-only steps, first (the extension builds meanwhile): the chunked
# talking-heads strategy since its mixing passes loop over row groups (2026-11-28: SASS a thread
# per score halved, 16-byte accesses): its `gpu` tests; the bench, chunked (what STRATEGY =
# "chunked" runs) beside the default (the chunked forward, the fused backward) and timm eager at
# CaiT's 224 px shapes, CaiT-M's (the target still missed) first; then the tune at 16 heads: the
# fused backward's tiles first (16 warps: its 975 us at CaiT-M must drop 16 %, the chunked
# backward's 2074 by 61 %), then the chunked backward's groups a program (GROUPS_PER_PROGRAM).
if want pending; then
  pytest_gpu pytest_gpu_pending_triton "$(budget 60)" tests/ops/test_talking_heads_chunked.py
  cap=$(budget 70)
  step bench_talking_heads_chunked "$cap" "$PY" -m bench.ops.talking_heads --impls triton_chunked,triton,eager \
    --shapes cait_m_224,cait_s_224,cait_xxs_224 --time-budget $((cap - 15)) --out "$work/talking_heads_chunked"
  jsonl+=("$work/talking_heads_chunked.jsonl")
  cap=$(budget 110)
  step bench_tune_pending "$cap" "$PY" -m bench.tune --tunables talking_heads.tc_bwd,talking_heads.chunked_bwd \
    --shapes cait_m_224 --time-budget $((cap - 20)) --out "$work/tune_pending"
fi
[[ -n $installing ]] && wait "$installing"
want tests && pytest_gpu pytest_gpu_cuda "$(budget 150)" tests/ops/*_cuda.py

# Host time per op call at tiny shapes, per backend, and where the triton forwards spend it
# (cProfile): in this step's log.
want demo && step bench_overhead "$(budget 45)" "$PY" -m bench.overhead --calls 100 --profile --out "$work/overhead"
# One Triton launch by tensor count: jit vs its launcher with tensors vs integer pointers, and
# cuPointerGetAttribute alone (the suspected ~10-20 us a tensor of the H100 run): a few seconds.
want demo && step bench_launch_cost "$(budget 20)" "$PY" -m bench.launch_cost --out "$work/launch_cost"

# The trainer end to end on the GPU (data loading, bf16, distillation, checkpoints, logs): the
# README's main job cut to a few epochs; its accuracy table is at the end of this step's log.
want demo && step demo_gpu "$(budget 75)" "$PY" -m deit_fast demo --device cuda --epochs 3 --teacher-epochs 2 \
  --no-soft --num_workers 4 --output_dir "$work/demo"
# DeiT-Ti's host-bound training step, eager and replayed from a CUDA graph (--cuda-graph): the
# second epoch's img/s of each (the first holds the compiles and the capture).
for graph in "" --cuda-graph; do
  want demo && step "train_deit_tiny${graph:+_graph}" "$(budget 40)" "$PY" -m deit_fast train \
    --model deit_tiny_patch16_224 --synthetic --batch-size 256 --epochs 2 --steps-per-epoch 20 \
    --device cuda --no-model-ema $graph
done

# The attention kernels first (the largest unknowns), then the memory-bound ops; any bench/ops
# file not named here runs after them.
order=(attention talking_heads class_attention layerscale_layernorm distill_loss layerscale)
for file in bench/ops/*.py; do
  op=$(basename "$file" .py)
  [[ $op == __init__ || " ${order[*]} " == *" $op "* ]] || order+=("$op")
done
# Within the caps, only the baselines the targets name (the fastest forced SDPA backend for
# attention; timm eager and cudnn for class-attention), and the shapes with targets first.
declare -A extra=(
  [attention]="--impls triton,triton_masked,cuda,cuda_m64,cuda_m64_s4,cuda_m128_s2,cuda_m128_s3,sdpa_cudnn,sdpa_flash,sdpa_efficient --shapes d48_h8_n197,d48_h4_n196,deit_small_224,deit_base_224,deit_tiny_224,deit_small_distilled_224,d48_h8_n576,deit_base_384"
  [class_attention]="--impls triton,cuda,cuda_prefetch,eager,sdpa_cudnn"
  # the default and its targets' baselines first, then each strategy alone; the CUDA-core family
  # (11 ms a call at CaiT-S, 2026-11-27) only in full runs
  [talking_heads]="--impls triton,eager,compile,triton_tc,triton_chunked --shapes cait_s_224,cait_xxs_224,cait_m_224"
)
# The most cases and impls (talking heads: 8 Triton kernels to compile, torch.compile) and the
# largest unknowns; the rest 40 s
declare -A caps=([attention]=90 [talking_heads]=90)
want ops || order=()
for op in "${order[@]}"; do
  cap=$(budget "${caps[$op]:-40}")
  # shellcheck disable=SC2086  # extra holds several words on purpose
  step "bench_$op" "$cap" "$PY" -m "bench.ops.$op" --time-budget $((cap - 15)) ${extra[$op]:-} --out "$work/$op"
  jsonl+=("$work/$op.jsonl")
done

# Opt-in (GPU_CHECK_PARTS=tune, alone; up to 7 minutes): the tile-config sweep of the
# talking-heads, residual + LayerNorm, class-attention and self-attention kernels (bench/tune.py),
# in that order (the least measured first); its table is in the log and in tune.md beside the
# results.
if want tune; then
  cap=$(budget 420)
  step bench_tune "$cap" "$PY" -m bench.tune --time-budget $((cap - 30)) --out "$work/tune"
fi

# Opt-in (GPU_CHECK_PARTS=profile; about 2 minutes): Nsight Compute profiles of the kernels behind
# the targets still missed (bench/ncu.py): a table per kernel (throughputs, occupancy, stall
# reasons) in ncu.md, every metric in ncu.csv, both beside the results.
if want profile; then
  cap=$(budget 180)
  step ncu_profile "$cap" "$PY" -m bench.ncu --timeout $((cap - 15)) --out "$work/ncu"
fi

# Opt-in (GPU_CHECK_PARTS=pending; about 9 minutes with the build): the measurements that decide
# what is built but left off or never timed. The talking-heads steps ran above, during the build;
# here every class-attention `gpu` test (its CUDA op changed, prefetch included), the cp.async
# variant of the residual + LayerNorm backward (CUDA_PREFETCH) and the CUDA attention forward
# at 32 rows a warp (CUDA_ROWS_PER_WARP): their gpu tests and sanitizer runs, then each against
# its default; last, the distillation loss on both kernel backends since its one-launch backward.
if want pending; then
  # class attention's fp32 output for the backward's delta (b67d55f) changed the CUDA op: all
  # its `gpu` tests, the peaked-softmax ones of both backends included
  pytest_gpu pytest_gpu_pending_class_attention "$(budget 90)" tests/ops/test_class_attention_cuda.py \
    tests/ops/test_class_attention.py
  pytest_gpu pytest_gpu_pending "$(budget 100)" \
    tests/ops/test_layerscale_layernorm_cuda.py tests/ops/test_attention_cuda.py \
    -k "prefetch or sanitizer or tilings or deterministic"
  cap=$(budget 50)
  step bench_class_attention_prefetch "$cap" "$PY" -m bench.ops.class_attention --impls cuda,cuda_prefetch,eager \
    --time-budget $((cap - 15)) --out "$work/class_attention_prefetch"
  jsonl+=("$work/class_attention_prefetch.jsonl")
  cap=$(budget 45)
  step bench_layernorm_prefetch "$cap" "$PY" -m bench.ops.layerscale_layernorm --impls cuda,cuda_prefetch \
    --time-budget $((cap - 15)) --out "$work/layernorm_prefetch"
  jsonl+=("$work/layernorm_prefetch.jsonl")
  cap=$(budget 55)
  step bench_attention_rows_per_warp "$cap" "$PY" -m bench.ops.attention --impls cuda,cuda_w32,cuda_w32_s3,sdpa_cudnn \
    --shapes d48_h8_n197,d48_h4_n196,d48_h8_n576,deit_small_224 --time-budget $((cap - 15)) \
    --out "$work/attention_rows_per_warp"
  jsonl+=("$work/attention_rows_per_warp.jsonl")
  cap=$(budget 40)
  step bench_distill_loss_backends "$cap" "$PY" -m bench.ops.distill_loss --impls triton,cuda,compile \
    --kinds hard --time-budget $((cap - 15)) --out "$work/distill_loss_backends"
  jsonl+=("$work/distill_loss_backends.jsonl")
fi

if want models; then
  cap=$(budget 50)
  step bench_models "$cap" "$PY" -m bench.models --quick --impls ours,timm --time-budget $((cap - 15)) \
    --models deit_tiny_patch16_224,deit_small_patch16_224,deit_base_patch16_224,deit_base_patch16_384,cait_xxs24_224,cait_s24_224,cait_xxs24_384,cait_s24_384,cait_m36_384 \
    --out "$work/models"
  jsonl+=("$work/models.jsonl")

  # Where DeiT-Ti's step goes (it was host-bound): kernels by GPU time, and the GPU-busy share.
  for impl in ours timm; do
    step "profile_deit_tiny_$impl" "$(budget 30)" "$PY" -m bench.profile --model deit_tiny_patch16_224 \
      --impl "$impl" --out "$work/profile_deit_tiny_$impl.txt"
  done

  cap=$(budget 60)
  step bench_train "$cap" "$PY" -m bench.train --quick --impls ours,timm --time-budget $((cap - 25)) \
    --models deit_small,cait_xxs24 --settings none,hard_cl,hard_nchw --out "$work/train"
  jsonl+=("$work/train.jsonl")

  # The RegNetY-16GF teacher was ~2/3 of a hard-distilled DeiT-S step (H200, 2026-11-26): the
  # same step with the teacher compiled, its BatchNorms folded (--compile-teacher), beside it.
  cap=$(budget 150)
  step bench_train_frozen_teacher "$cap" "$PY" -m bench.train --quick --impls ours --time-budget $((cap - 20)) \
    --models deit_small --settings hard_cl,hard_cl_frozen --out "$work/train_frozen"
  jsonl+=("$work/train_frozen.jsonl")

  cap=$(budget 160)
  step bench_models_compile "$cap" "$PY" -m bench.models --quick --impls ours_compile,timm_compile \
    --time-budget $((cap - 70)) --models deit_small_patch16_224,cait_xxs24_224 --out "$work/models_compile"
  jsonl+=("$work/models_compile.jsonl")
fi

junits=(--junit gpu_triton="$work/pytest_gpu_triton.xml" --junit gpu_cuda="$work/pytest_gpu_cuda.xml")
want pending && junits+=(--junit gpu_pending_triton="$work/pytest_gpu_pending_triton.xml"
                         --junit gpu_pending_class_attention="$work/pytest_gpu_pending_class_attention.xml"
                         --junit gpu_pending="$work/pytest_gpu_pending.xml")
"$PY" -m bench.report --steps "$steps" "${junits[@]}" "${jsonl[@]}" | tee "$work/written"
if [[ -n $copy_to ]]; then
  mkdir -p "$copy_to"
  cp $(cat "$work/written") "$copy_to"/
  [[ -f $work/tune.md ]] && cp "$work/tune.md" "$work/tune.jsonl" "$copy_to"/
  [[ -f $work/tune_pending.md ]] && cp "$work/tune_pending.md" "$work/tune_pending.jsonl" "$copy_to"/
  [[ -f $work/ncu.md ]] && cp "$work/ncu.md" "$work/ncu.csv" "$copy_to"/
  for log in "$work"/*.log; do  # one file: the device tool brings back at most 8
    printf '\n===== %s\n' "$(basename "$log")"
    cat "$log"
  done >"$copy_to/logs.txt"
fi
echo "total ${SECONDS}s; logs in $work"
