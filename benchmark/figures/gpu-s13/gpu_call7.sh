#!/usr/bin/env bash
# session 13, after the fused encode: its GPU tests, fp8 flat at 128K, origin in one pass
OUT=$1; PART=$2
export PYTHONPATH=$PWD
python -m pip install -q --no-index --find-links .wheels -r .wheels/requirements.txt > /dev/null 2>&1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > $OUT/gpu.txt
COMMON="--warmup-prefill 16384 --decode-tokens 32 --max-seconds-per-row 60"
FLAT="--set model.offload=true --set model.offload_access=direct --set model.pin_memory=true --set model.host_pool_tokens=524288 --set model.max_cached_block=192"
if [ "$PART" = a ]; then
  timeout 220 python -m pytest -v -m gpu tests/test_kernels_triton.py -k "encodes_codes or codec_gpu or form_blocks_into" -p no:cacheprovider > $OUT/tests.log 2>&1
  grep -E "PASSED|FAILED|ERROR|passed|failed" $OUT/tests.log | tail -12
  timeout 130 python benchmark/speed.py --rows inf-llm-fattn --lengths 128k $COMMON $FLAT --set model.offload_dtype=fp8 --out $OUT/flat-fp8-128k.json > $OUT/speed-a.log 2>&1
  timeout 120 python benchmark/speed.py --rows origin-sdpa-1pass --lengths 32k,128k $COMMON --out $OUT/origin-1pass.json >> $OUT/speed-a.log 2>&1
  grep -E "^inf-llm|^origin|Error" $OUT/speed-a.log
else
  timeout 300 python benchmark/speed.py --rows inf-llm-fattn --lengths 1m $COMMON $FLAT --set model.offload_dtype=fp8 --set model.host_pool_tokens=1048576 --max-seconds-per-row 200 --out $OUT/flat-fp8-1m.json > $OUT/speed-b.log 2>&1
  timeout 150 python benchmark/speed.py --rows inf-llm-fattn --lengths 128k $COMMON $FLAT --out $OUT/flat-128k.json >> $OUT/speed-b.log 2>&1
  grep -E "^inf-llm|^origin|Error" $OUT/speed-b.log
fi
