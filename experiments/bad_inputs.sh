#!/bin/bash
# Usage: bash experiments/bad_inputs.sh  -> bad_inputs.tsv (command, seconds, exit code, leftovers, message)
# Each bad command line against the real CLI: seconds to fail, exit code, stderr's error lines, leftovers.
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
OUT=${OUT:-bad_inputs.tsv}; : > $OUT
ROOT=$(mktemp -d); rm -rf $ROOT; mkdir -p $ROOT
mkdir -p $ROOT/emptyrun  # a run folder without checkpoints
i=0
while IFS= read -r line; do
  [ -z "$line" ] && continue
  i=$((i+1)); rd=$ROOT/run$i; line=${line//EMPTYRUN/$ROOT/emptyrun}
  start=$(date +%s.%N)
  ${PYTHON:-.venv/bin/python} -m unlearn.train $line hydra.run.dir=$rd paths.root=$ROOT paths.cache=$ROOT/cache 2>$ROOT/err$i >/dev/null
  rc=$?
  end=$(date +%s.%N)
  left=$( [ -e $rd ] && echo "run folder LEFT" || echo "nothing left")
  msg=$(grep '^error: ' $ROOT/err$i | tr '\n' ' ' ); [ -z "$msg" ] && msg="(no error line) $(tail -c 300 $ROOT/err$i | tr '\n' ' ')"
  printf "%s\t%.1f\t%s\t%s\t%s\n" "$line" "$(echo "$end - $start" | bc)" "$rc" "$left" "$msg" >> $OUT
done <<'LIST'
method.lam=-1
method.warmup_steps=500 method.steps=100
method.lr=-1e-4
method.lr=fast
method=distill method.ema_decay=1.5
method=distill method.loss=kl
method.steps=0
method.granularity=row
method.trainable=everything
eval.cs_convention=hessel2
eval.prompts=none
+resume=/nonexistent/last.ckpt
data.batch_size=0
data.images_per_prompt=0
trainer.devices=0
trainer.accelerator=gpu
eval.fid_feature=inceptionv3
method=distill method.loss=cw data.batch_size=1
method.retain=all
method.betas=[0.9,1.5]
+method.lamda=1
seed=-1
method=nosuch
concept=van_goh
model=sd99
resume=EMPTYRUN
LIST
ls $ROOT/cache 2>/dev/null && echo "CACHE LEFT" >> $OUT
