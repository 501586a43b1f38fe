"""The entry point's wiring: every config composes, SD-1.4 and toy run through the same path, bad input fails clean."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from toy_helpers import compose_train as make_cfg

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}


def names(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def assert_composes(tmp_path, model, method, concept):
    resolved = OmegaConf.to_container(make_cfg(tmp_path, f"model={model}", f"method={method}", f"concept={concept}"),
                                      resolve=True)
    assert resolved["concept"]["name"] == concept
    assert resolved["method"]["_target_"].startswith("unlearn.methods.")
    assert resolved["run_name"] == f"{concept}-{resolved['method']['name']}"


# Methods and concepts are independent groups (a method reads the concept only through ${concept}), so every
# method with one concept of each kind, and every concept with the method that reads the whole concept node.
@pytest.mark.parametrize("model", ["toy", "sd14", "sd2", "sd2_v", "sdxl"])
@pytest.mark.parametrize("method", names("method"))
def test_every_method_composes(tmp_path, model, method):
    for concept in ("toy_stripes", "van_gogh", "nudity"):
        assert_composes(tmp_path, model, method, concept)


@pytest.mark.parametrize("model", ["toy", "sd14"])
def test_every_concept_composes(tmp_path, model):
    for concept in names("concept"):
        assert_composes(tmp_path, model, "uce", concept)


def test_experiments_compose(tmp_path):
    for exp in names("experiment"):
        cfg = make_cfg(tmp_path, f"experiment={exp}")
        assert OmegaConf.to_container(cfg, resolve=True)["method"]["steps"] > 0


def tiny_run(tmp_path, pipeline, *overrides):
    from unlearn.train import run

    cfg = make_cfg(tmp_path, f"model.path={pipeline}", "method.steps=3",
                   "data.num_prompts=2", "data.images_per_prompt=2", "data.batch_size=2", "data.gen_batch_size=2",
                   "model.sample_steps=2", "model.guidance_scale=3.0", "evaluate=false", "logger=none",
                   "trainer=cpu", "trainer.enable_progress_bar=false", "+checkpoint_every=2", *overrides)
    return run(cfg)


def test_sd14_code_path_wires_exactly_as_toy(tmp_path, tiny_pipeline_path):
    """`model=sd14` with its path pointed at a tiny random SD folder trains through the same code as `model=toy`."""
    from diffusers import StableDiffusionPipeline

    out = {}
    for model in ("sd14", "toy"):
        res = tiny_run(tmp_path / model, tiny_pipeline_path, f"model={model}", "concept=van_gogh", "method=cdc_cpg",
                       "method.warmup_steps=1")
        pipe = StableDiffusionPipeline.from_pretrained(res["pipeline"])
        out[model] = pipe.unet.state_dict()
        assert (Path(res["pipeline"]).parent / "checkpoints" / "last.ckpt").exists()
    original = StableDiffusionPipeline.from_pretrained(tiny_pipeline_path).unet.state_dict()
    assert any(not torch.equal(out["sd14"][k], original[k]) for k in original), "training changed nothing"
    for k in original:
        assert torch.equal(out["sd14"][k], out["toy"][k]), k


def test_distill_runs_through_train(tmp_path, tiny_pipeline_path):
    from diffusers import StableDiffusionPipeline

    res = tiny_run(tmp_path, tiny_pipeline_path, "concept=toy_ring", "method=distill", "method.sample_steps=2")
    assert StableDiffusionPipeline.from_pretrained(res["pipeline"]).unet is not None


def test_eval_every_adds_progress_rows_and_leaves_training_alone(tmp_path, tiny_pipeline_path):
    from safetensors.torch import load_file

    small_eval = ["evaluate=true", "eval.num_prompts=1", "eval.images_per_prompt=2", "eval.implicit=false",
                  "eval.neighbours=false"]
    res = {every: tiny_run(tmp_path / str(every), tiny_pipeline_path, "concept=toy_ring", "method=distill",
                           "method.sample_steps=2", *small_eval, f"eval_every={every}") for every in (0, 1)}
    assert list(res[1]["metrics"]["results"]) == ["original", "distill@1", "distill@2", "distill"]
    assert list(res[0]["metrics"]["results"]) == ["original", "distill"]
    # Evaluation draws from its own generators: the trained weights are bit-identical with and without it.
    a, b = (load_file(Path(res[e]["pipeline"]) / "unet" / "diffusion_pytorch_model.safetensors") for e in (0, 1))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # Resumed from iteration 2, the run re-scores iteration 1 and 2 from their cached images and finishes.
    (ckpt,) = (tmp_path / "1" / "run" / "checkpoints").glob("iteration=2.ckpt")
    resumed = tiny_run(tmp_path / "1", tiny_pipeline_path, "concept=toy_ring", "method=distill",
                       "method.sample_steps=2", *small_eval, "eval_every=1", f"resume='{ckpt}'")
    rows = resumed["metrics"]["results"]
    assert list(rows) == ["original", "distill@1", "distill@2", "distill"]
    for label in ("original", "distill@1", "distill@2"):
        assert rows[label] == res[1]["metrics"]["results"][label], label


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "unlearn.train", *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=300, check=False)


def test_help_lists_the_config_groups(tmp_path):
    r = run_cli("--help", cwd=ROOT)
    assert r.returncode == 0, r.stderr
    for group in ("concept", "method", "model"):
        assert group in r.stdout


def test_bad_model_path_fails_clean(tmp_path):
    run_dir = tmp_path / "run"
    r = run_cli("model.path=/nowhere/sd", f"hydra.run.dir={run_dir}", f"paths.root={tmp_path}", cwd=ROOT)
    assert r.returncode == 2
    assert "/nowhere/sd" in r.stderr
    assert not run_dir.exists()


def test_folder_without_unet_names_it(tmp_path, tiny_pipeline_path):
    import shutil

    from unlearn.models.loading import ModelLoadError, load_components

    broken = tmp_path / "broken"
    shutil.copytree(tiny_pipeline_path, broken)
    shutil.rmtree(broken / "unet")
    with pytest.raises(ModelLoadError, match="unet/"):
        load_components(str(broken))
    shutil.rmtree(broken / "tokenizer")
    shutil.copytree(tiny_pipeline_path / "tokenizer", broken / "tokenizer")
    shutil.copytree(tiny_pipeline_path / "unet", broken / "unet")
    (broken / "tokenizer" / "vocab.json").write_text("{not json")
    for f in (broken / "tokenizer").glob("tokenizer.json"):
        f.unlink()
    with pytest.raises(ModelLoadError, match="tokenizer"):
        load_components(str(broken))


def test_unknown_model_group_is_named(tmp_path):
    r = run_cli("model=sd99", f"hydra.run.dir={tmp_path}/run", cwd=ROOT)
    assert r.returncode != 0
    assert "sd99" in r.stderr


def test_third_party_noise_is_dropped_and_real_notices_kept(caplog):
    import logging
    import warnings

    from unlearn.utils.quiet import quiet_third_party

    quiet_third_party()
    quiet_third_party()  # idempotent: one filter
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    assert len(log.filters) == 1
    with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"):
        log.info("💡 Tip: For seamless cloud logging, try installing litlogger")
        log.info("GPU available: False, used: False")
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False, used: False"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="transformers.utils.import_utils"):
        logging.getLogger("transformers.utils.import_utils").warning(
            "`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil`")
    assert not caplog.records
    with warnings.catch_warnings(record=True) as seen:
        quiet_third_party()  # catch_warnings resets the filters it inherits; set ours inside
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning, stacklevel=1)
        warnings.warn("something of ours", UserWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["something of ours"]
