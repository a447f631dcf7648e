#!/usr/bin/env bash
# The collapse ablation of paper sec. 3.5 on the synthetic world, on one GPU, in three phases that each
# fit a 10-minute call (outputs under $ROOT persist between them):
#   bash benchmarks/collapse_synthetic.sh data     # 2,000 portraits at 64^2, small CLIP (lvlm=cnn), Stage 1
#                                                  # (tiny backbone, $STAGE1_TIME), oracle canonicalisation
#   bash benchmarks/collapse_synthetic.sh stage2   # Stage 2 twice from the same Stage-1 checkpoint and seed:
#                                                  # regularizer.jacobian_weight=0.01 (paper) and =0, $STAGE2_STEPS each
#   bash benchmarks/collapse_synthetic.sh compare  # FID/KID of both (task=evaluate) and the text metrics
#                                                  # (benchmarks.compare_stage2) -> $ROOT/collapse.json
# The captions keep their nuisance phrases (the synthetic default), so the CLIP embeddings carry the
# per-image noise (photo id, grain, cast, background) that drives the collapse.
set -euo pipefail
ROOT=${ROOT:-outputs/collapse}
STAGE1_TIME=${STAGE1_TIME:-00:00:05:00}
STAGE2_STEPS=${STAGE2_STEPS:-600}
DATA=$ROOT/synthetic_64
COMMON=(experiment=demo trainer=gpu trainer.precision=32-true data.batch_size=32 data.num_workers=6
        data.path=$DATA data.kind=folder lvlm=cnn lvlm.weights=$ROOT/clip.pt logger=none
        trainer.enable_progress_bar=false trainer.log_every_n_steps=100 regularizer.blur_fade_kimg=20)

case "${1:-}" in
  data)
    python run.py task=make_synthetic data.path=$DATA data.synthetic.num_images=2000 data.synthetic.resolution=64 \
        data.synthetic.workers=12 print_config=false
    python run.py task=train_lvlm "${COMMON[@]}" lvlm.device=cuda task.steps=1500 hydra.run.dir=$ROOT/lvlm
    python run.py task=train_stage1 "${COMMON[@]}" trainer.max_time=$STAGE1_TIME trainer.max_steps=1000000 \
        evaluation.at_end=false task.checkpoint_every_kimg=0 task.grid_every_steps=0 hydra.run.dir=$ROOT/stage1
    python run.py task=canonicalize "${COMMON[@]}" task.embed=oracle task.out=$ROOT/cache task.device=cuda \
        lvlm.device=cuda task.batch_size=64 hydra.run.dir=$ROOT/canonicalize
    ;;
  stage2)
    for run in rr:0.01 norr:0; do
      python run.py task=train_stage2 "${COMMON[@]}" task.stage1=$ROOT/stage1/checkpoints/last.ckpt \
          data.clip_cache=$ROOT/cache trainer.max_steps=$STAGE2_STEPS regularizer.jacobian_weight=${run#*:} \
          evaluation.at_end=false task.checkpoint_every_kimg=0 task.grid_every_steps=0 hydra.run.dir=$ROOT/${run%%:*}
    done
    ;;
  compare)
    for run in rr norr; do
      python run.py task=evaluate "${COMMON[@]}" task.checkpoint=$ROOT/$run/checkpoints/last.ckpt \
          data.clip_cache=$ROOT/cache evaluation.fid_samples=2000 evaluation.real_max=2000 \
          evaluation.kid_subset_size=500 evaluation.batch_size=64 hydra.run.dir=$ROOT/$run/eval
    done
    python -m benchmarks.compare_stage2 --device cpu --data $DATA --lvlm-weights $ROOT/clip.pt \
        --run with_Rr=$ROOT/rr/checkpoints/last.ckpt --run without_Rr=$ROOT/norr/checkpoints/last.ckpt \
        --samples 8 --out $ROOT/collapse.json
    ;;
  *)
    echo "usage: $0 data|stage2|compare" >&2; exit 2 ;;
esac
