#!/usr/bin/env bash
# The GPU checks of the fast path (issue 6) on one machine with one GPU, in parts that each fit a
# 10-minute command, every result under OUT (at most 8 files per part: a lent GPU machine returns 8).
#
#   bash benchmark/gpu_suite.sh OUT tests   # kernel, fast-vs-torch agreement, decode-graph and fused-op GPU tests
#   bash benchmark/gpu_suite.sh OUT speed   # origin (chunked, one pass) vs inf-llm at 32K/128K (one run), then 512K
#   bash benchmark/gpu_suite.sh OUT fused   # 128K without and with model.fused_elementwise, and the kernel bench
#   bash benchmark/gpu_suite.sh OUT flat    # offload_access: direct + host_pool_tokens at 32K/128K/512K
#   bash benchmark/gpu_suite.sh OUT profile # wall vs kernel time per 8K chunk at 16K-80K, with GPU clocks sampled
#   bash benchmark/gpu_suite.sh OUT cache   # direct's device block cache: its kernel tests, the flat configuration at
#                                           # 32K/128K/512K, at 128K with 128 slots, and the device path at 128K
#   bash benchmark/gpu_suite.sh OUT table   # report's speed runs and profile, without its tests
#   bash benchmark/gpu_suite.sh OUT walls   # host (queued) vs wall time per 8K chunk, device path and flat
#                                           # configuration (which of the two waits for the other)
#   bash benchmark/gpu_suite.sh OUT flat-fp8 # the flat configuration with offload_dtype: fp8 at 128K, then 1M (a 1M-token
#                                           # pinned pool of codes: ~65 GiB of host memory)
#   bash benchmark/gpu_suite.sh OUT pacing  # 128K, flat configuration then device path, each paced as the engine
#                                           # paces a prefill and then with a sync per chunk (for the A/B)
#   bash benchmark/gpu_suite.sh OUT report  # one ~8-minute command: quick kernel tests, speed (32K/128K with
#                                           # origin, then 512K), flat, profile, then the agreement tests
#
# TESTS_TIMEOUT (seconds, default 560) bounds the tests part, e.g. to run it after another part in one command.
# On a fresh machine the first Triton compiles take minutes (the tests part spent ~7 of its minutes so on an
# H200; on an H100 the first run reached its 570 s limit after 41 of the 47 tests, and a second run
# on the warm machine, its compiled kernels cached, took 26 s for all 47). Wheels the machine lacks:
# scripts/fetch_device_wheels.sh (installed here when .wheels exists).
set -uo pipefail
cd "$(dirname "$(realpath "$0")")/.."
OUT=${1:?usage: gpu_suite.sh OUT tests|speed|fused|flat|flat-fp8|profile|cache|walls|pacing|table|report}
PART=${2:?usage: gpu_suite.sh OUT tests|speed|fused|flat|flat-fp8|profile|cache|walls|pacing|table|report}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ -f .wheels/requirements.txt ]; then
    python -m pip install -q --no-index --find-links .wheels -r .wheels/requirements.txt > /dev/null 2>&1
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpu.txt" 2>&1
COMMON=(--warmup-prefill 16384 --decode-tokens 32 --max-seconds-per-row 60)
DEVICE=(--set model.offload=false)
# flat GPU memory: blocks in pinned host memory, read by the GPU through a 192-slot device cache per layer
FLAT=(--set model.offload=true --set model.offload_access=direct --set model.pin_memory=true
      --set model.host_pool_tokens=524288 --set model.max_cached_block=192)

# Each run: its time limit, then the log its output is appended to (parts share them: `report` runs most).
speed_main() {
    timeout "$1" python benchmark/speed.py --rows origin-sdpa,origin-sdpa-1pass,inf-llm-fattn --lengths 32k,128k "${COMMON[@]}" \
        "${DEVICE[@]}" --out "$OUT/speed-main.json" >> "$2" 2>&1
}
speed_512k() {
    timeout "$1" python benchmark/speed.py --rows inf-llm-fattn --lengths 512k "${COMMON[@]}" "${DEVICE[@]}" \
        --out "$OUT/speed-512k.json" >> "$2" 2>&1
}
speed_flat() {
    timeout "$1" python benchmark/speed.py --rows inf-llm-fattn --lengths 32k,128k,512k "${COMMON[@]}" \
        "${FLAT[@]}" --out "$OUT/speed-flat.json" >> "$2" 2>&1
}
profile() {  # with the GPU's clocks, power and throttle reasons sampled every 200 ms
    nvidia-smi --query-gpu=timestamp,utilization.gpu,clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active \
        --format=csv -lms 200 > "$OUT/smi.csv" 2>&1 &
    local smi=$!
    timeout "$1" python -m benchmark.profile_prefill --tokens 65536 --warmup 16384 --offload off --top 60 \
        > "$OUT/profile-prefill.txt" 2>&1
    kill $smi
}
table_runs() {  # the README table's runs into log $1, then the profile with time limit $2
    speed_main 270 "$1"
    speed_512k 120 "$1"
    speed_flat 200 "$1"
    profile "$2"
}

case "$PART" in
tests)
    timeout "${TESTS_TIMEOUT:-560}" python -m pytest -q -rA -m gpu tests/test_launcher.py tests/test_pacing.py \
        tests/test_kernels_triton.py tests/test_gpu_agreement.py \
        tests/test_decode_graph.py tests/test_fused_elementwise.py -p no:cacheprovider > "$OUT/gpu-tests.log" 2>&1
    echo "pytest exit $?" >> "$OUT/gpu-tests.log"
    tail -3 "$OUT/gpu-tests.log"
    ;;
speed)
    speed_main 270 "$OUT/speed-main.log"
    speed_512k 150 "$OUT/speed-512k.log"
    tail -6 "$OUT/speed-main.log"; tail -3 "$OUT/speed-512k.log"
    ;;
fused)
    for fused in false true; do
        timeout 150 python benchmark/speed.py --rows inf-llm-fattn --lengths 128k "${COMMON[@]}" "${DEVICE[@]}" \
            --set model.fused_elementwise=$fused --out "$OUT/speed-fused-$fused.json" > "$OUT/speed-fused-$fused.log" 2>&1
        tail -3 "$OUT/speed-fused-$fused.log"
    done
    timeout 150 python -m benchmark.kernels_bench --out "$OUT/kernels.json" > "$OUT/kernels.log" 2>&1
    tail -20 "$OUT/kernels.log"
    ;;
flat)
    speed_flat 300 "$OUT/speed-flat.log"
    tail -6 "$OUT/speed-flat.log"
    ;;
profile)
    profile 200
    grep "wall per chunk" "$OUT/profile-prefill.txt"
    ;;
cache)
    log="$OUT/cache.log"
    timeout 150 python -m pytest -q -m gpu tests/test_kernels_triton.py -k "cache_blocks or rotate or global_stage" \
        -p no:cacheprovider >> "$log" 2>&1
    speed_flat 220 "$log"
    timeout 90 python benchmark/speed.py --rows inf-llm-fattn --lengths 128k "${COMMON[@]}" "${FLAT[@]}" \
        --set model.max_cached_block=128 --out "$OUT/speed-flat-128slots.json" >> "$log" 2>&1
    timeout 90 python benchmark/speed.py --rows inf-llm-fattn --lengths 128k "${COMMON[@]}" "${DEVICE[@]}" \
        --out "$OUT/speed-device-128k.json" >> "$log" 2>&1
    grep -E "passed|failed|\] prefill|^inf-llm" "$log"
    ;;
flat-fp8)  # ~5 minutes: pinning the 1M pool alone takes ~40 s
    timeout 150 python benchmark/speed.py --rows inf-llm-fattn --lengths 128k "${COMMON[@]}" "${FLAT[@]}" \
        --set model.offload_dtype=fp8 --out "$OUT/speed-flat-fp8-128k.json" >> "$OUT/flat-fp8.log" 2>&1
    timeout 330 python benchmark/speed.py --rows inf-llm-fattn --lengths 1m "${COMMON[@]}" "${FLAT[@]}" \
        --set model.offload_dtype=fp8 --set model.host_pool_tokens=1048576 --max-seconds-per-row 200 \
        --out "$OUT/speed-flat-fp8-1m.json" >> "$OUT/flat-fp8.log" 2>&1
    grep -E "^inf-llm|Error" "$OUT/flat-fp8.log"
    ;;
pacing)  # ~3 minutes after the kernels are compiled
    for config in flat device; do
        if [ "$config" = flat ]; then set_=("${FLAT[@]}"); else set_=("${DEVICE[@]}"); fi
        for sync in "" --sync-per-chunk; do
            timeout 120 python benchmark/speed.py --rows inf-llm-fattn --lengths 128k "${COMMON[@]}" "${set_[@]}" \
                $sync --out "$OUT/pacing-$config${sync:+-sync}.json" >> "$OUT/pacing.log" 2>&1
        done
    done
    grep -E "^inf-llm" "$OUT/pacing.log"
    ;;
walls)  # ~2 minutes after the kernels are compiled
    log="$OUT/walls.log"
    for config in "--offload off" "--offload on ${FLAT[*]} --set model.host_pool_tokens=131072 --set model.async_global_stream=true"; do
        timeout 120 python -m benchmark.profile_prefill --tokens 49152 --warmup 16384 --walls-only $config >> "$log" 2>&1
    done
    grep -E "per chunk|Error" "$log"
    ;;
table)  # the report's measurements without its tests (~7 minutes)
    log="$OUT/report.log"
    table_runs "$log" 120
    grep -E "^inf-llm|^origin|wall per chunk" "$log" "$OUT/profile-prefill.txt"
    ;;
report)  # logs appended to one file: 7 files in all
    log="$OUT/report.log"
    timeout 120 python -m pytest -q -m gpu tests/test_kernels_triton.py -k "refine or rotate or global_stage" \
        -p no:cacheprovider >> "$log" 2>&1
    table_runs "$log" 150
    timeout "${TESTS_TIMEOUT:-150}" python -m pytest -q -rA -m gpu tests/test_gpu_agreement.py -p no:cacheprovider \
        >> "$log" 2>&1
    grep -E "passed|failed|^inf-llm|^origin|wall per chunk" "$log" "$OUT/profile-prefill.txt"
    ;;
*)
    echo "unknown part $PART: tests, speed, fused, flat, profile, cache, walls, table or report" >&2
    exit 2
    ;;
esac
