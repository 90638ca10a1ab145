#!/usr/bin/env bash
# Every GPU check of issue 30 in one run on one GPU, in <= 8 minutes, nothing downloaded:
#   the CUDA tests, sampling (ours: eager, CUDA graphs, graphs + compile; the release-cost baseline)
#   at batch 1 and 256, the heads table, training on both loss paths (+ --grad_checkpointing),
#   and every other outer family (and mvar_base) against MAR's at ARINAR-B size (bench/bench_families.py).
# ARINAR-B (--model mar_base), bf16, cfg 4.5, 64 steps, random weights.
#
#   bench/gpu_check.sh [RESULTS_DIR] [--cpu-smoke] [--budget SECONDS] [--parts "NAME ..."] [--dry-run]
#
# RESULTS_DIR (default bench/results/gpu/) receives one JSON and one log per part, parts.tsv,
# summary.json and summary.md (the table, also printed at the end). A part replaces what an earlier
# run left for it; --parts leaves the other parts' results, so a second run completes the first one's
# table. Each part runs under its own `timeout`, with an empty Inductor cache of its own; a part that
# fails or times out is recorded and the next one runs. Parts run in order of importance and share the
# budget (default 470 s): a part gets min(its cap, what is left) and is skipped when under 20 s are left.
# --cpu-smoke (or GPU_CHECK_SMOKE=1) shrinks every part to tiny CPU sizes to check the script itself; the
# compile parts then fail (no CUDA), on purpose.
# --dry-run prints each part's command and runs nothing.
set -u
cd "$(dirname "$0")/.."

PY=${PYTHON:-$(command -v python || command -v python3)}
OUT=bench/results/gpu
SMOKE=${GPU_CHECK_SMOKE:-0}
BUDGET=470
PARTS=""
DRY=0
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu-smoke) SMOKE=1 ;;
        --dry-run) DRY=1 ;;
        --budget) BUDGET=$2; shift ;;
        --parts) PARTS=$2; shift ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) OUT=$1 ;;
    esac
    shift
done
if [ "$DRY" = 0 ]; then
    mkdir -p "$OUT"
    # a whole run starts a new parts.tsv; --parts keeps the other parts' rows and files, to complete an earlier run
    [ -z "$PARTS" ] && : > "$OUT/parts.tsv"
    touch "$OUT/parts.tsv"
fi
START=$(date +%s)

if [ "$SMOKE" = 1 ]; then
    export OMP_NUM_THREADS=1
    RUN="--device cpu --precision fp32 --threads 1"
    MODEL="--width 32 --enc_dec_depth 1 --num_heads 4 --inner_ar_width 32 --img_size 64 --class_num 10"
    STEPS=4; BIG=4; ROWS_ITER=2; TRAIN_BATCH=2; TRAIN_STEPS=1; TRAIN_REPEATS=1
    HEADS="--diffloss_w 32 --diffloss_d 1 --num_sampling_steps 5"
    GRAPHS="eager"  # no CUDA graphs on a CPU: eager stands in, so the plumbing still runs
else
    RUN="--device cuda --precision bf16"
    MODEL="--model mar_base"
    STEPS=64; BIG=256; ROWS_ITER=2; TRAIN_BATCH=64; TRAIN_STEPS=3; TRAIN_REPEATS=2
    HEADS=""
    GRAPHS="eager cuda_graphs"
fi
SAMPLE="$PY -m bench.bench_sampling $RUN $MODEL --cfg 4.5 --num_iter $STEPS"

# part_limit CAP: the seconds a part capped at CAP may run now, min(CAP, budget left)
part_limit() {
    local left=$(( BUDGET - ($(date +%s) - START) - 5 ))
    echo $(( $1 < left ? $1 : left ))
}

# part NAME CAP COMMAND...: run COMMAND under timeout part_limit CAP; log to NAME.log
part() {
    local name=$1 cap=$2; shift 2
    if [ -n "$PARTS" ] && [[ " $PARTS " != *" $name "* ]]; then return; fi
    if [ "$DRY" = 1 ]; then echo "$name (cap $cap s): $*"; return; fi
    # what an earlier run left for this part goes: a part that fails now must not show old numbers
    rm -f "$OUT/$name.json" "$OUT/$name.log" "$OUT/$name.xml"
    grep -v "^$name"$'\t' "$OUT/parts.tsv" > "$OUT/parts.tsv.new"; mv "$OUT/parts.tsv.new" "$OUT/parts.tsv"
    local left=$(( BUDGET - ($(date +%s) - START) - 5 ))
    local limit=$(part_limit "$cap")
    if [ "$limit" -lt 20 ]; then
        printf '%s\tskipped\t0\t%s\tonly %s s of the %s s budget left\n' "$name" "$cap" "$left" "$BUDGET" >> "$OUT/parts.tsv"
        echo "== $name: skipped (only $left s of the budget left)"
        return
    fi
    echo "== $name (timeout $limit s): $*"
    local t0=$(date +%s)
    # an empty Inductor (and Triton) cache per part: a compile part's first call is a cold compile, as a
    # user's first run is, not one warmed by the part before it
    local cache=$(mktemp -d)
    TORCHINDUCTOR_CACHE_DIR="$cache" TRITON_CACHE_DIR="$cache/triton" timeout -k 10 "$limit" "$@" \
        > "$OUT/$name.log" 2>&1
    local rc=$? note=""
    rm -rf "$cache"
    [ "$rc" = 124 ] || [ "$rc" = 137 ] && note="timed out after $limit s"
    [ "$rc" != 0 ] && [ -z "$note" ] && note="$(grep -E 'Error|error|FAILED' "$OUT/$name.log" | tail -1 | cut -c1-160)"
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$limit" "$note" >> "$OUT/parts.tsv"
    echo "   rc $rc in $(( $(date +%s) - t0 )) s ${note:+($note)}"
}

# Order and caps (s): eager_rows 45, cuda_tests 120, families 150, sampling_b256 100, sampling_b1 70, train 60,
# train_ckpt 60, heads 80, compile_b256 120, compile_b1 90, compile_ways 150; the caps add up to more than the
# budget, so the last parts run only as far as the time the earlier ones left.
# 1. issue 30's eager crash: at batch 256 with 2 steps, step 1 draws 75 tokens per image (x2 for CFG):
#    38,400 rows x 4 heads in one attention call, past CUDA's grid limit unless split (the first call, 2 steps,
#    is timed apart as "first call s")
part eager_rows 45 $SAMPLE --num_iter $ROWS_ITER --batch_size $BIG --backends eager --warmup 1 --repeats 1 \
    --baseline_repeats 0 --flops_batch 0 --json "$OUT/eager_rows.json"
# 2. every test that skips without CUDA: the files that ask for CUDA (grep), and in them the tests
#    bench/cuda_tests.py finds skipped without it (a module that fails to import costs only itself)
#    (the compile variants last; no test starts in the part's last 30 s, so pytest writes its report)
CUDA_TEST_FILES=$(grep -l "cuda.is_available" tests/test_*.py)
CUDA_TESTS_LIMIT=$(part_limit 120)
export CUDA_TESTS_SECONDS=$(( CUDA_TESTS_LIMIT > 60 ? CUDA_TESTS_LIMIT - 30 : CUDA_TESTS_LIMIT / 2 ))
part cuda_tests 120 $PY -m pytest -q -rs -p no:cacheprovider -p bench.cuda_tests --continue-on-collection-errors \
    $CUDA_TEST_FILES --junitxml "$OUT/cuda_tests.xml"
# 3. every other outer family against MAR's in one process (bench/bench_families.py: the same head and backend,
#    MAR measured once), b1 and b256, one timed call each after the first (memory, capture): each family's preset
#    nearest to mar_base (models.FAMILIES), and mvar_base, so that M-VAR's mixer (plain-PyTorch scan) runs on
#    the GPU too (var_base is the scale-wise family's nearest); a contender that fails (out of memory) is
#    recorded and the others go on. Early: it is all the family issues need besides the CUDA tests.
if [ "$SMOKE" = 1 ]; then
    CONTENDERS="--reference_model mar_tiny --contenders causal_tiny scalewise_tiny mvar_tiny"
    FAMILY_SIZES="$MODEL --batch_sizes 1 2"
else
    FAMILY_NAMES=""
    if [ -z "$PARTS" ] || [[ " $PARTS " == *" families "* ]]; then  # (asking costs a torch import)
        FAMILY_NAMES=$($PY -c "import models; print(' '.join(f for f in models.FAMILIES if f != 'mar'))" 2>/dev/null)
    fi
    CONTENDERS="--contenders $FAMILY_NAMES mvar_base"
    FAMILY_SIZES="--batch_sizes 1 $BIG"
fi
part families 150 $PY -m bench.bench_families $RUN $FAMILY_SIZES $CONTENDERS --num_iter $STEPS --cfg 4.5 \
    --repeats 1 --breakdown --json "$OUT/families.json"
# 4-5. sampling, ours against the release baseline in the same process (FLOPs per image counted once, at batch 1),
#      with each batch's GPU time split between the outer Steps and the head (CUDA events: no added syncs)
part sampling_b256 100 $SAMPLE --batch_size $BIG --backends $GRAPHS --repeats 1 --baseline_repeats 1 \
    --flops_batch 0 --breakdown --json "$OUT/sampling_b256.json"
part sampling_b1 70 $SAMPLE --batch_size 1 --backends $GRAPHS --repeats 3 --baseline_repeats 1 \
    --flops_batch 1 --breakdown --json "$OUT/sampling_b1.json"
# 6-7. training steps/s, images/s, MFU and peak memory on both loss paths; then with --grad_checkpointing
TRAIN="$PY -m bench.bench_train $RUN $MODEL --batch_size $TRAIN_BATCH --steps $TRAIN_STEPS --repeats $TRAIN_REPEATS"
part train 60 $TRAIN --json "$OUT/train.json"
part train_ckpt 60 $TRAIN --grad_checkpointing --json "$OUT/train_ckpt.json"
# 8. the heads table: MAR's diffusion head at 64 outer steps; ARINAR's row (64 steps, cfg 4.5, the same model and
#    backend) is the sampling parts' (bench/gpu_summary.py), so it is not timed twice
part heads 80 $PY -m bench.bench_heads $RUN $MODEL $HEADS --only mar_64 --batch_sizes 1 $BIG \
    --warmup 1 --repeats 1 --json "$OUT/heads.json"
# 9-10. CUDA graphs + torch.compile last: its first call (compilation) is the slowest and least sure part
if [ "$SMOKE" = 1 ]; then COMPILE_RUN="--device cpu --precision fp32 --threads 1"; else COMPILE_RUN=$RUN; fi
part compile_b256 120 $PY -m bench.bench_sampling $COMPILE_RUN $MODEL --cfg 4.5 --num_iter $STEPS --batch_size $BIG \
    --backends cuda_graphs+compile --repeats 1 --baseline_repeats 0 --flops_batch 0 --breakdown \
    --json "$OUT/compile_b256.json"
part compile_b1 90 $PY -m bench.bench_sampling $COMPILE_RUN $MODEL --cfg 4.5 --num_iter $STEPS --batch_size 1 \
    --backends cuda_graphs+compile --repeats 3 --baseline_repeats 0 --flops_batch 0 --breakdown \
    --json "$OUT/compile_b1.json"

# 11. the compile time of each Step whole against block by block (--compile's way), each in a fresh process with
#     an empty Inductor cache: whether compiling by blocks is what keeps the warm-up short on a GPU too
if [ "$SMOKE" = 1 ]; then COMPILER="--compiler eager"; else COMPILER=""; fi
part compile_ways 150 $PY -m bench.bench_compile $RUN $MODEL $COMPILER --json "$OUT/compile_ways.json"
[ "$DRY" = 1 ] && exit 0
echo "== summary ($(( $(date +%s) - START )) s in all)"
$PY -m bench.gpu_summary "$OUT" --seconds "$(( $(date +%s) - START ))" --budget "$BUDGET"
