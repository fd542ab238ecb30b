#!/usr/bin/env bash
# On the device: RULER-style sweep of SmolLM2 memory settings (host lookup path, torch ops). Resumable.
# usage: bash scripts/device_ruler_sweep.sh SECONDS LENGTHS TASKS CASES VARIANT...
set -u
budget=$1 lengths=$2 tasks=$3 cases=$4; shift 4
export INFLLM_CACHE_DIR=/root/infcache PYTHONPATH=/root/src PYTHONUNBUFFERED=1
mkdir -p /root/res
cd /root/src || exit 1
base="model.path=/root/smol,model.gguf_file=SmolLM2-135M-Instruct.Q4_1.gguf,model.device=cuda,model.offload=true,model.offload_access=cache,model.max_cached_block=64"
args=()
for v in "$@"; do name=${v%%=*}; ov=${v#*=}; args+=(--variant "$name=$base${ov:+,$ov}"); done
timeout "$budget" python -m benchmark.ruler --lengths "$lengths" --tasks "$tasks" --cases "$cases" \
  --out /root/res/sweep.json "${args[@]}" 2>&1 | grep -v -i "warn" | tail -n 400
python -c "
import json; from benchmark import ruler
print(ruler.markdown(ruler.summarize(json.load(open('/root/res/sweep.json'))['results'])))" > /root/res/report.txt 2>&1
cp /root/res/sweep.json /root/res/report.txt "$OUT"/ 2>/dev/null; cat /root/res/report.txt | head -80
