#!/usr/bin/env bash
# backbone.upconv_fir=fold against split on one GPU, in one device call: the batch-32 bf16
# text -> portrait (bench_generate, graphed and not) and the coarse and fine inversion steps
# (bench_canonicalize, bf16, half the steps coarse), each setting into its own JSON:
#   bash benchmarks/compare_upconv_fir.sh [out_dir]      (default benchmarks/results; on the device: $OUT)
# Each setting compiles its own graphs (about 1-2 minutes apiece at eg3d_512 with a cold Inductor cache).
set -euo pipefail
out=${1:-benchmarks/results}
mkdir -p "$out"
for fir in fold split; do
  python -m benchmarks.bench_generate --device cuda --precisions bf16 --batches 32 --upconv-fir "$fir" \
    --out "$out/generate-cuda-upconv-$fir.json"
  python -m benchmarks.bench_canonicalize --device cuda --batches 32 --random-lpips --precision bf16 \
    --coarse-fraction 0.5 --upconv-fir "$fir" --out "$out/canonicalize-cuda-upconv-$fir.json"
done
python - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for kind in ("generate", "canonicalize"):
    for fir in ("fold", "split"):
        for r in json.loads((out / f"{kind}-cuda-upconv-{fir}.json").read_text())["results"]:
            print(f"{fir:5s} {r['name']:60s} b{r['batch']:<3d} {r['median_ms']:9.2f} ms {r['items_per_s']:9.1f}/s")
PY
