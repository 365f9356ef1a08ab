#!/usr/bin/env bash
# The GPU validation, in one command from the repository root on a machine with a GPU:
# the GPU test suite (its kernels compiled first, in parallel), then compute-sanitizer (memcheck,
# racecheck, synccheck, initcheck, side by side) over tools/sanitize_cases.py. Prints a summary
# table last; exits non-zero if anything failed.
# Logs go to $LOG_DIR (default: a temporary directory).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
log_dir=${LOG_DIR:-$(mktemp -d)}
mkdir -p "$log_dir"
python=${PYTHON:-python3}

# Compile what the suite runs in parallel first (CuPy's disk cache), so the suite's workers find it.
"$python" tools/precompile.py --dtypes float16 bfloat16 float32 float64 --headdims 16 32 64 96 128 160 192 224 256 \
    --features 0 1 >"$log_dir/precompile.log" 2>&1

parallel=()
if "$python" -c "import xdist" 2>/dev/null; then parallel=(-n "${JOBS:-8}"); fi
"$python" -m pytest -m gpu -q -p no:cacheprovider "${parallel[@]}" tests >"$log_dir/gpu_suite.log" 2>&1
suite_rc=$?
suite=$(grep -E "(passed|failed|error)" "$log_dir/gpu_suite.log" | tail -n 1)
tail -n 40 "$log_dir/gpu_suite.log"
# On Hopper the 16-bit forward takes the sm_90a family; the kernel suites run again on the mma.sync family.
CUPYFLASH_KERNELS=sm80 "$python" -m pytest -m gpu -q -p no:cacheprovider "${parallel[@]}" tests/test_gpu.py tests/test_gpu_varlen.py \
    tests/test_gpu_variants.py >"$log_dir/gpu_suite_sm80.log" 2>&1
sm80_rc=$?
suite_sm80=$(grep -E "(passed|failed|error)" "$log_dir/gpu_suite_sm80.log" | tail -n 1)
tail -n 20 "$log_dir/gpu_suite_sm80.log"
# float32 and float64 take tensor cores; the kernel suites run again on the CUDA-core kernels.
CUPYFLASH_KERNELS=simt "$python" -m pytest -m gpu -q -p no:cacheprovider "${parallel[@]}" tests/test_gpu.py tests/test_gpu_varlen.py \
    tests/test_gpu_variants.py tests/test_fidelity.py -k "float32 or float64 or fully_masked or cuda_kernels" \
    >"$log_dir/gpu_suite_simt.log" 2>&1
simt_rc=$?
suite_simt=$(grep -E "(passed|failed|error)" "$log_dir/gpu_suite_simt.log" | tail -n 1)
tail -n 20 "$log_dir/gpu_suite_simt.log"

declare -A errors
status=$(( suite_rc || sm80_rc || simt_rc ))
"$python" tools/sanitize_cases.py >/dev/null  # compile outside the sanitizer
tools=(memcheck racecheck synccheck initcheck)
declare -A pids
for tool in "${tools[@]}"; do  # one process each, side by side on the GPU
    compute-sanitizer --tool "$tool" --error-exitcode 1 "$python" tools/sanitize_cases.py \
        >"$log_dir/sanitizer_$tool.log" 2>&1 &
    pids[$tool]=$!
done
for tool in "${tools[@]}"; do
    wait "${pids[$tool]}"
    rc=$?
    # memcheck, synccheck, initcheck: "ERROR SUMMARY: N errors"; racecheck: "(N errors, M warnings)"
    errors[$tool]=$(grep -Eo "(ERROR SUMMARY: [0-9]+ error|\([0-9]+ error)" "$log_dir/sanitizer_$tool.log" \
        | grep -Eo "[0-9]+" | tail -n 1)
    [ -n "${errors[$tool]}" ] || errors[$tool]="did not run (rc $rc)"
    [ "$rc" -eq 0 ] || status=1
done

echo
echo "| check | result |"
echo "| --- | --- |"
echo "| GPU suite | ${suite:-no summary (rc $suite_rc)} |"
echo "| GPU kernel suites, CUPYFLASH_KERNELS=sm80 | ${suite_sm80:-no summary (rc $sm80_rc)} |"
echo "| float32/float64 kernel suites, CUPYFLASH_KERNELS=simt | ${suite_simt:-no summary (rc $simt_rc)} |"
for tool in "${tools[@]}"; do echo "| compute-sanitizer $tool | ${errors[$tool]} errors |"; done
echo "logs: $log_dir"
exit "$status"
