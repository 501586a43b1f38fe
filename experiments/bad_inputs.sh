#!/bin/bash
# Usage: bash experiments/bad_inputs.sh  -> a markdown table on stdout (and in $OUT, default bad_inputs.md)
# Each bad command line, against the real CLI of one of the five entry points, in a folder of its own (its
# paths.root and run folder): seconds to fail, exit code, the `error:` line, and what it left behind. Every one must
# fail in < 15 s with exit code 2, one line, nothing left; the last line of the table says whether all did.
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
# No Hub: the real model is out of reach (an empty Hugging Face cache and HF_HUB_OFFLINE=1), as on a new machine.
ROOT=$(mktemp -d); export HF_HOME=$ROOT/hf HF_HUB_OFFLINE=1
mkdir -p $ROOT/emptyrun  # a run folder without checkpoints
# A delta made from another base model (its fingerprint is not the toy model's), and a safetensors file that is no
# delta at all.
${PYTHON:-.venv/bin/python} - "$ROOT" <<'PY'
import json, sys, torch
from safetensors.torch import save_file
from unlearn.export import FORMAT, FORMAT_VERSION
fp = {"dtype": "torch.float32", "configs_sha": "0" * 64, "weights_sha": "0" * 64, "tokenizer_sha": "0" * 64}
meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "component": "unet", "base": "another/model",
        "base_revision": "", "base_dtype": "float32", "base_fingerprint": json.dumps(fp)}
save_file({"conv_in.bias": torch.zeros(32)}, f"{sys.argv[1]}/foreign_delta.safetensors", metadata=meta)
save_file({"w": torch.zeros(1)}, f"{sys.argv[1]}/weights.safetensors")
# What validation reads of an SDXL folder: its index's class and the two extra parts (the toy model's, copied).
import shutil
from pathlib import Path
from unlearn.models.loading import TOY_PIPELINE
xl = Path(shutil.copytree(TOY_PIPELINE, f"{sys.argv[1]}/xl_pipeline"))
index = json.loads((xl / "model_index.json").read_text())
(xl / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionXLPipeline"}))
shutil.copytree(xl / "text_encoder", xl / "text_encoder_2")
shutil.copytree(xl / "tokenizer", xl / "tokenizer_2")
PY
OUT=${OUT:-bad_inputs.md}
LIMIT_S=15
{
echo "| # | command | s | exit | the one line printed | left behind |"
echo "|---|---|---|---|---|---|"
i=0; bad=0
while IFS= read -r line; do
  [ -z "$line" ] && continue
  i=$((i+1)); case=$ROOT/case$i; mkdir -p $case
  module=${line%% *}; args=${line#* }; args=${args//EMPTYRUN/$ROOT/emptyrun}
  args=${args//FOREIGNDELTA/$ROOT/foreign_delta.safetensors}; args=${args//NOTADELTA/$ROOT/weights.safetensors}
  args=${args//XLFOLDER/$ROOT/xl_pipeline}
  extra=(paths.root=$case)
  [ "$module" != compare ] && extra+=(hydra.run.dir=$case/run)
  start=$(date +%s.%N)
  # shellcheck disable=SC2086 # the arguments are split on purpose
  (cd $case && ${PYTHON:-$OLDPWD/.venv/bin/python} -m unlearn.$module $args "${extra[@]}" >/dev/null 2>$ROOT/err$i)
  rc=$?
  seconds=$(echo "$(date +%s.%N) - $start" | bc)
  left=$(find $case -mindepth 1 | sed "s|$case/||" | head -3 | tr '\n' ' ')
  errors=$(grep -c '^error: ' $ROOT/err$i)
  msg=$(grep '^error: ' $ROOT/err$i | head -1 | sed 's/^error: //; s/|/\\|/g')
  [ "$errors" -ne 1 ] && msg="($errors error lines) $msg $(tail -c 200 $ROOT/err$i | tr '\n' ' ')"
  ok=$(echo "$seconds < $LIMIT_S" | bc)
  { [ "$rc" -ne 2 ] || [ "$errors" -ne 1 ] || [ -n "$left" ] || [ "$ok" -ne 1 ]; } && bad=$((bad+1))
  printf '| %d | `python -m unlearn.%s %s` | %.1f | %s | %s | %s |\n' $i "$module" "${line#* }" "$seconds" "$rc" \
    "$msg" "${left:-nothing}"
done <<'LIST'
train method.lam=-1
train method.warmup_steps=500 method.steps=100
train method.lr=fast
train method=distill method.loss=kl
train method.lamdb=1
train +method.lamdb=1
train method=rece +method.lamdb=1
train +method.lam=1
train trainer.max_stepz=3
train +trainer.max_steps=3
train trainer.devices=0
train logger=wandb logger.project=[1,2]
train logger=wandb logger.0.project=[1,2]
train model.revision=nope
train speed.compile=maybe
train speed=fast speed.attention=flash
train concept=van_gogh method=cdc_cpg
train model=sd14 concept=toy_ring
train model=sd14 concept=van_gogh
train model=sd14 concept=snoopy model.revision=v9
train model.path=/nowhere/sd
train method=nosuch
train concept=van_goh
train resume=EMPTYRUN
train method.lam=[
train seed=-1
train export=zip
prepare data.batch_sise=2
prepare concept=snoopy
prepare data.images_per_prompt=0
evaluate eval.num_promptz=2
evaluate +candidates=[/nowhere/pipeline]
evaluate concept=nudity
evaluate +candidates=[NOTADELTA]
evaluate +candidates=[FOREIGNDELTA]
compare methods=[nope]
compare methods=[uce] method.lamdb=1
compare concept=van_gogh methods=[uce]
compare concepts=[toy_ring,van_gogh] methods=[uce]
attack attack.kk=3
attack attack.k=0
attack detector.threshold=1.5
attack pipelines=[/nowhere/pipeline]
attack concept=van_gogh
attack attack=ring_a_bel
attack attack=ring_a_bell attack.eta=0
attack attack=ring_a_bell_toy attack.eta=-1
attack attack=ring_a_bell attack.population=1
attack attack=[toy,ring_a_bel]
compare concept=toy_ring methods=[uce] robustness.enabled=true robustness.attacks=[ring_a_bel]
compare concept=toy_ring methods=[uce] robustness.enabled=true robustness.attack.num_prompts=0
train method=uce method.adapter=lora
train method=esd_x method.adapter=lora method.lora.rank=0
train model=sdxl model.path=toy concept=van_gogh method=uce
train model=sd14 model.path=XLFOLDER concept=van_gogh method=uce
attack model=sdxl concept=van_gogh
LIST
echo
echo "$i command lines; $bad not failing in < ${LIMIT_S} s with exit code 2, one line and nothing left."
} | tee $OUT
rm -rf $ROOT
