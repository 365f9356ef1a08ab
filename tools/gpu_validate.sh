#!/usr/bin/env bash
# The GPU validation, from the repository root on a machine with a GPU, in stages that each fit a device
# call (STAGES: any of suite, sm80, simt, sanitize, fuzz; all by default):
#   suite     the GPU test suite (its kernels compiled first, in parallel)
#   sm80      the kernel suites again on the mma.sync family (on Hopper the 16-bit kernels take sm_90a)
#   simt      the float32 and float64 kernel suites again on the CUDA-core kernels
#   sanitize  compute-sanitizer (memcheck, racecheck, synccheck, initcheck, side by side) over
#             tools/sanitize_cases.py's parts ($SANITIZE_PARTS, default every part)
#   fuzz      tools/fuzz.py: problems drawn wider than the suite's, for $FUZZ_SECONDS (default 300) on $JOBS
#             workers, the kernel families in turn, from seed $FUZZ_SEED (default 0; another seed, other cases)
# Prints a summary table last; exits non-zero if anything failed. Logs go to $LOG_DIR (default: a temporary
# directory).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
log_dir=${LOG_DIR:-$(mktemp -d)}
mkdir -p "$log_dir"
python=${PYTHON:-python3}

stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(suite sm80 simt sanitize fuzz)
for stage in "${stages[@]}"; do
    case $stage in
    suite | sm80 | simt | sanitize | fuzz) ;;
    *) echo "gpu_validate.sh: unknown stage '$stage' (suite, sm80, simt, sanitize, fuzz)" >&2; exit 2 ;;
    esac
done
parallel=()
blas=()  # NumPy's BLAS threads per pytest worker, unless set: the workers' float64 references share the cores
if "$python" -c "import xdist" 2>/dev/null; then
    # worksteal: an idle worker takes the tests queued behind another's long Hypothesis test (xdist >= 3.2)
    dist=$("$python" -c "import xdist; v = tuple(map(int, xdist.__version__.split('.')[:2])); \
print('worksteal' if v >= (3, 2) else 'load')")
    parallel=(-n "${JOBS:-8}" --dist "$dist")
    threads=$(( $(nproc) / ${JOBS:-8} > 0 ? $(nproc) / ${JOBS:-8} : 1 ))
    blas=("OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-$threads}" "OMP_NUM_THREADS=${OMP_NUM_THREADS:-$threads}")
fi
kernel_suites=(tests/test_gpu.py tests/test_gpu_varlen.py tests/test_gpu_variants.py)
status=0
rows=()

# A pytest run as one row of the summary: its name, its log's name, then pytest's arguments.
run_suite() {
    local name=$1 log=$2
    shift 2
    # -v: each test's result as it ends, so that a log cut short by a time limit names what did not finish
    env "${blas[@]}" "$python" -m pytest -m gpu -v -p no:cacheprovider "${parallel[@]}" "$@" >"$log_dir/$log" 2>&1
    local rc=$?
    tail -n 20 "$log_dir/$log"
    local summary
    summary=$(grep -E "[0-9]+ [a-z]+.* in [0-9.]+s" "$log_dir/$log" | tail -n 1 | sed -E "s/^=+ | =+$//g")  # pytest's last line
    rows+=("| $name | ${summary:-no summary (rc $rc)} |")
    [ "$rc" -eq 0 ] || status=1
}

for stage in "${stages[@]}"; do
    case $stage in
    suite)
        # Compile what the suite runs in parallel first (CuPy's disk cache), so the suite's workers find it.
        "$python" tools/precompile.py --dtypes float16 bfloat16 float32 float64 \
            --headdims 16 32 64 96 128 160 192 224 256 --features 0 1 >"$log_dir/precompile.log" 2>&1
        run_suite "GPU suite" gpu_suite.log tests ;;
    sm80) CUPYFLASH_KERNELS=sm80 run_suite "GPU kernel suites, CUPYFLASH_KERNELS=sm80" gpu_suite_sm80.log \
        "${kernel_suites[@]}" ;;
    simt) CUPYFLASH_KERNELS=simt run_suite "float32/float64 kernel suites, CUPYFLASH_KERNELS=simt" gpu_suite_simt.log \
        "${kernel_suites[@]}" tests/test_fidelity.py -k "float32 or float64 or fully_masked or cuda_kernels" ;;
    sanitize)
        read -r -a parts <<<"${SANITIZE_PARTS:-}"
        "$python" tools/sanitize_cases.py "${parts[@]}" >/dev/null  # compile outside the sanitizer
        tools=(memcheck racecheck synccheck initcheck)
        declare -A pids
        # initcheck does not count a bulk copy's global store (cp.async.bulk) as a write, so it would report
        # every read of the Hopper backward's dq accumulator, whose tiles' first sums are bulk stores
        # (add_dq_tile): flash_bwd_dq_convert, which reads it, is left out of initcheck only.
        declare -A options=([initcheck]="--kernel-name-exclude kns=flash_bwd_dq_convert")
        for tool in "${tools[@]}"; do  # one process each, side by side on the GPU
            read -r -a tool_options <<<"${options[$tool]:-}"
            compute-sanitizer --tool "$tool" "${tool_options[@]}" --error-exitcode 1 "$python" \
                tools/sanitize_cases.py "${parts[@]}" \
                >"$log_dir/sanitizer_$tool.log" 2>&1 &
            pids[$tool]=$!
        done
        for tool in "${tools[@]}"; do
            wait "${pids[$tool]}"
            rc=$?
            # memcheck, synccheck, initcheck: "ERROR SUMMARY: N errors"; racecheck: "(N errors, M warnings)"
            errors=$(grep -Eo "(ERROR SUMMARY: [0-9]+ error|\([0-9]+ error)" "$log_dir/sanitizer_$tool.log" \
                | grep -Eo "[0-9]+" | tail -n 1)
            [ -n "$errors" ] && errors="$errors errors" || errors="did not run (rc $rc)"
            # a count from a run whose cases failed (a Python error) covers only the cases before it
            grep -q "^Traceback" "$log_dir/sanitizer_$tool.log" && errors="$errors, the cases stopped early (rc $rc)"
            rows+=("| compute-sanitizer $tool (${SANITIZE_PARTS:-every part}) | $errors |")
            [ "$rc" -eq 0 ] || status=1
        done ;;
    fuzz)
        "$python" tools/fuzz.py --seconds "${FUZZ_SECONDS:-300}" --workers "${JOBS:-8}" --seed "${FUZZ_SEED:-0}" \
            --json "$log_dir/fuzz.json" \
            >"$log_dir/fuzz.log" 2>&1
        rc=$?
        tail -n 20 "$log_dir/fuzz.log"
        summary=$(grep -E "^fuzz: " "$log_dir/fuzz.log" | tail -n 1)
        rows+=("| tools/fuzz.py | ${summary:-no summary (rc $rc)} |")
        [ "$rc" -eq 0 ] || status=1 ;;
    esac
done

echo
echo "| check | result |"
echo "| --- | --- |"
printf '%s\n' "${rows[@]}"
echo "logs: $log_dir"
exit "$status"
