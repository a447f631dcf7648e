#!/usr/bin/env bash
# backbone.upconv_fir=fold against split on one GPU, in one device call per half: the batch-32 bf16
# text -> portrait (bench_generate, graphed and not) and the coarse and fine inversion steps
# (bench_canonicalize, bf16, half the steps coarse), each setting into its own JSON:
#   bash benchmarks/compare_upconv_fir.sh [out_dir] [all|generate|canonicalize]
#   (out_dir default benchmarks/results; on the device: $OUT)
# Each setting compiles its own graphs with a cold Inductor cache: on an H200 (2026-12-07) the
# generate half took 2.7 and 1.9 minutes per setting, and one canonicalize setting did not finish in
# 2.5 minutes, so the two halves do not fit one 10-minute device call together: run them apart.
set -euo pipefail
out=${1:-benchmarks/results}
part=${2:-all}
case $part in all|generate|canonicalize) ;; *) echo "part: expected all, generate or canonicalize, got $part" >&2; exit 2;; esac
mkdir -p "$out"
for fir in fold split; do
  [ "$part" = canonicalize ] || python -m benchmarks.bench_generate --device cuda --precisions bf16 --batches 32 --upconv-fir "$fir" \
    --out "$out/generate-cuda-upconv-$fir.json"
  [ "$part" = generate ] || python -m benchmarks.bench_canonicalize --device cuda --batches 32 --random-lpips --precision bf16 \
    --coarse-fraction 0.5 --upconv-fir "$fir" --out "$out/canonicalize-cuda-upconv-$fir.json"
done
python - "$out" "$part" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for kind in (("generate", "canonicalize") if sys.argv[2] == "all" else (sys.argv[2],)):
    for fir in ("fold", "split"):
        for r in json.loads((out / f"{kind}-cuda-upconv-{fir}.json").read_text())["results"]:
            print(f"{fir:5s} {r['name']:60s} b{r['batch']:<3d} {r['median_ms']:9.2f} ms {r['items_per_s']:9.1f}/s")
PY
