#!/usr/bin/env bash
# Download LongBench and InfiniteBench into the layout benchmark/run_eval.py reads (needs internet; the CI
# machines have none and never run this).
#
#   bash benchmark/download_data.sh [DATA_DIR] [longbench] [infinitebench]
#
# DATA_DIR defaults to benchmark/results/data (git-ignored). With no benchmark named, both are fetched:
#   DATA_DIR/longbench/data/<task>.jsonl     LongBench v1 (all 21 tasks + LongBench-E), from its data.zip
#   DATA_DIR/infinite-bench/<task>.jsonl     the InfiniteBench tasks the InfLLM paper uses
# Then: python -m benchmark.run_eval predict --data-dir DATA_DIR --tasks longbench,infinitebench ...
set -euo pipefail

DATA_DIR="${1:-benchmark/results/data}"
shift || true
WANT="${*:-longbench infinitebench}"

LONGBENCH_ZIP="https://huggingface.co/datasets/THUDM/LongBench/resolve/main/data.zip"
INFINITEBENCH_BASE="https://huggingface.co/datasets/xinrongzhang2022/InfiniteBench/resolve/main"
INFINITEBENCH_TASKS="passkey number_string kv_retrieval longbook_choice_eng longbook_qa_eng longbook_sum_eng math_find code_debug"

fetch() {  # fetch URL FILE: curl or wget, resumable, failing on HTTP errors
  if command -v curl >/dev/null 2>&1; then
    curl -fL --retry 3 -C - -o "$2" "$1"
  elif command -v wget >/dev/null 2>&1; then
    wget -c -O "$2" "$1"
  else
    echo "need curl or wget" >&2
    exit 1
  fi
}

for what in $WANT; do
  case "$what" in
    longbench)
      mkdir -p "$DATA_DIR/longbench"
      fetch "$LONGBENCH_ZIP" "$DATA_DIR/longbench/data.zip"
      if command -v unzip >/dev/null 2>&1; then
        unzip -o -q "$DATA_DIR/longbench/data.zip" -d "$DATA_DIR/longbench"
      else
        python3 -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" \
          "$DATA_DIR/longbench/data.zip" "$DATA_DIR/longbench"
      fi
      echo "LongBench: $(ls "$DATA_DIR/longbench/data" | wc -l) files in $DATA_DIR/longbench/data"
      ;;
    infinitebench)
      mkdir -p "$DATA_DIR/infinite-bench"
      for task in $INFINITEBENCH_TASKS; do
        fetch "$INFINITEBENCH_BASE/$task.jsonl" "$DATA_DIR/infinite-bench/$task.jsonl"
      done
      echo "InfiniteBench: $(ls "$DATA_DIR/infinite-bench" | wc -l) files in $DATA_DIR/infinite-bench"
      ;;
    *)
      echo "unknown benchmark '$what' (longbench, infinitebench)" >&2
      exit 2
      ;;
  esac
done
