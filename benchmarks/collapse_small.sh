#!/usr/bin/env bash
# The collapse ablation of paper sec. 3.5 in a small-data regime, in ONE GPU call of < 10 minutes:
# few images (each seen hundreds of times) make every cached embedding identify its image quickly,
# which is what drives the collapse (p(x | r) -> a delta). Both Stage-2 arms run side by side on the
# same GPU from the same Stage-1 checkpoint, seed and wall-clock budget:
#   bash benchmarks/collapse_small.sh            # -> $ROOT/{rr,norr}/checkpoints/last.ckpt and $OUT/collapse/
# then, on any machine (the CPU is fine):
#   python -m benchmarks.compare_stage2 --data $ROOT/synthetic_64 --lvlm-weights $ROOT/clip.pt --cache $ROOT/cache \
#       --run with_Rr=$ROOT/rr/checkpoints/last.ckpt --run without_Rr=$ROOT/norr/checkpoints/last.ckpt --out collapse.json
# The captions keep their nuisance phrases (the synthetic default): the CLIP embeddings carry each
# image's noise (photo id, grain, cast, background).
set -euo pipefail
ROOT=${ROOT:-outputs/collapse_small}
NUM_IMAGES=${NUM_IMAGES:-256}
LVLM_STEPS=${LVLM_STEPS:-800}
STAGE1_TIME=${STAGE1_TIME:-00:00:02:45}
STAGE2_TIME=${STAGE2_TIME:-00:00:04:15}
BATCH=${BATCH:-64}
DATA=$ROOT/synthetic_64
COMMON=(experiment=demo trainer=gpu trainer.precision=32-true data.batch_size=$BATCH data.num_workers=4
        data.path=$DATA data.kind=folder lvlm=cnn lvlm.weights=$ROOT/clip.pt logger=none
        trainer.enable_progress_bar=false trainer.log_every_n_steps=50 regularizer.blur_fade_kimg=20)
TRAIN=(evaluation.at_end=false task.checkpoint_every_kimg=0 task.grid_every_steps=0 trainer.max_steps=1000000)
stamp() { echo "== $(date +%T) $*"; }

stamp data
python run.py task=make_synthetic data.path=$DATA data.synthetic.num_images=$NUM_IMAGES data.synthetic.resolution=64 \
    data.synthetic.workers=12 print_config=false
stamp lvlm
python run.py task=train_lvlm "${COMMON[@]}" lvlm.device=cuda task.steps=$LVLM_STEPS hydra.run.dir=$ROOT/lvlm
stamp stage1
python run.py task=train_stage1 "${COMMON[@]}" "${TRAIN[@]}" trainer.max_time=$STAGE1_TIME hydra.run.dir=$ROOT/stage1
stamp canonicalize
python run.py task=canonicalize "${COMMON[@]}" task.embed=oracle task.out=$ROOT/cache task.device=cuda \
    lvlm.device=cuda task.batch_size=64 hydra.run.dir=$ROOT/canonicalize
stamp stage2
for run in rr:0.01 norr:0; do
  python run.py task=train_stage2 "${COMMON[@]}" "${TRAIN[@]}" task.stage1=$ROOT/stage1/checkpoints/last.ckpt \
      data.clip_cache=$ROOT/cache trainer.max_time=$STAGE2_TIME \
      regularizer.jacobian_weight=${run#*:} hydra.run.dir=$ROOT/${run%%:*} > $ROOT/${run%%:*}.log 2>&1 &
done
wait
stamp done
tail -n 3 $ROOT/rr.log $ROOT/norr.log
