"""`method.adapter=lora`: a LoRA (peft) on the method's trainable subset for every gradient method; merged into the
exported UNet; beside a delta, a diffusers LoRA file that `load_lora_weights` loads; checkpoints hold only the LoRA;
a closed-form method refuses it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file
from toy_helpers import ROOT, compose_train

from unlearn.export import DELTA_FILE
from unlearn.methods.adapters import LORA_FILE
from unlearn.models import encode_prompts
from unlearn.models.loading import load_components

TINY_RUN = ["model=toy", "concept=toy_ring", "data.num_prompts=2", "data.images_per_prompt=2", "data.batch_size=2",
            "data.gen_batch_size=2", "model.sample_steps=2", "evaluate=false", "logger=none", "trainer=cpu",
            "trainer.enable_progress_bar=false", "trainer.deterministic=true"]
# lr 1e-2: two steps move B far enough that the LoRA's effect is far above float rounding.
LORA_RUN = ["method=conabl", "method.adapter=lora", "method.lora.rank=2", "method.lora.alpha=6", "method.lr=1e-2"]
PROMPTS = ["a red ring", "a blue ring in the style of stripes"]


def conabl(components, **kw):
    from unlearn.methods.conabl import ConceptAblation

    return ConceptAblation(components, adapter="lora", lora={"rank": 2, "alpha": 6.0, "dropout": 0.0}, **kw)


def batch_of(components, n=2):
    g = torch.Generator().manual_seed(3)
    emb = encode_prompts(components.tokenizer, components.text_encoder, PROMPTS)
    c = components.unet.config
    return {"latents": torch.randn(n, c.in_channels, c.sample_size, c.sample_size, generator=g),
            "anchor_emb": emb[[0] * n], "target_emb": emb[[1] * n]}


def fit(module, batch, steps):
    trainer = L.Trainer(accelerator="cpu", max_epochs=-1, max_steps=-1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader([batch] * steps, batch_size=None))


def plain_names(state: dict) -> dict:
    """A LoRA-wrapped UNet's base tensors under the plain UNet's names."""
    return {k.replace(".base_layer.", "."): v for k, v in state.items() if ".lora_" not in k}


# ------------------------------------------------------------------------------------------------ the module
def test_only_the_lora_trains_and_only_on_the_methods_subset(tiny_pipeline_path):
    components = load_components(str(tiny_pipeline_path))
    before = {k: v.clone() for k, v in components.unet.state_dict().items()}
    torch.manual_seed(0)
    module = conabl(components, steps=2, lr=1e-2)  # trainable: cross_attn_kv
    wrapped = {n.split(".lora_")[0] for n in module.trainable_names}
    assert wrapped == {k.removesuffix(".weight") for k in before if ".attn2.to_k.w" in k or ".attn2.to_v.w" in k}
    assert {id(p) for p in module.trainable_parameters()} == \
        {id(p) for n, p in module.unet.named_parameters() if ".lora_" in n}
    lora_before = {n: p.detach().clone() for n, p in module.unet.named_parameters() if ".lora_" in n}
    fit(module, batch_of(components), 2)
    after = plain_names(module.unet.state_dict())
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    moved = [n for n, p in module.unet.named_parameters() if ".lora_B" in n and not torch.equal(p, lora_before[n])]
    assert len(moved) == len(wrapped)


def test_merged_export_is_base_plus_alpha_over_rank_times_b_a(tiny_pipeline_path, tmp_path):
    from diffusers import UNet2DConditionModel

    components = load_components(str(tiny_pipeline_path))
    base = {k: v.clone() for k, v in components.unet.state_dict().items()}
    module = conabl(components, trainable="cross_attn")  # q, k, v, out of every attn2
    g = torch.Generator().manual_seed(1)
    factors = {}
    with torch.no_grad():
        for name, p in module.unet.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g))
            if ".lora_" in name:
                factors[name.replace(".default", "")] = p.detach().clone()
    module.export(tmp_path / "pipeline")
    exported = UNet2DConditionModel.from_pretrained(tmp_path / "pipeline" / "unet").state_dict()
    assert exported.keys() == base.keys()
    changed = {k for k in base if not torch.equal(exported[k], base[k])}
    assert changed == {k for k in base if ".attn2." in k and k.endswith(".weight")}
    for k in changed:
        m = k.removesuffix(".weight")
        by_hand = base[k] + (6.0 / 2) * factors[f"{m}.lora_B.weight"] @ factors[f"{m}.lora_A.weight"]
        torch.testing.assert_close(exported[k], by_hand, rtol=1e-5, atol=1e-6)
    assert set(module.trainable_names) == changed  # a delta of this module holds the merged weights


def test_distillation_teacher_carries_the_lora_and_the_original_stays_plain(tiny_pipeline_path):
    from unlearn.methods.distill import SelfDistill
    from unlearn.methods.esd import ESD

    lora = {"rank": 2, "alpha": 2.0, "dropout": 0.0}
    distill = SelfDistill(load_components(str(tiny_pipeline_path)), adapter="lora", lora=lora)
    teacher, student = distill.paired_parameters()  # EMA pairs: the LoRA factors, tensor for tensor
    assert teacher and all(".lora_" in n for n in distill.trainable_names)
    assert all(t is not s and torch.equal(t, s) for t, s in zip(teacher, student))
    esd = ESD(load_components(str(tiny_pipeline_path)), adapter="lora", lora=lora)
    assert not any(".lora_" in n for n, _ in esd.original.named_parameters())
    assert any(".lora_" in n for n, _ in esd.unet.named_parameters())


# ------------------------------------------------------------------------------------------------ through train
def train(root: Path, pipeline: Path, *overrides: str) -> Path:
    from unlearn.train import run

    run(compose_train(root, f"model.path={pipeline}", f"paths.cache={root.parent}/lora_cache", *TINY_RUN,
                      *overrides))
    return root / "run"


@pytest.fixture(scope="module")
def lora_run(tiny_pipeline_path, tmp_path_factory) -> Path:
    return train(tmp_path_factory.mktemp("lora_both"), tiny_pipeline_path, *LORA_RUN, "method.steps=2",
                 "export=both")


def unet_outputs(unet) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x, e = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 16, 16, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 600]), encoder_hidden_states=e).sample


def test_load_lora_weights_gives_the_merged_export(lora_run, tiny_pipeline_path):
    from diffusers import StableDiffusionPipeline

    import unlearn

    merged = unet_outputs(StableDiffusionPipeline.from_pretrained(lora_run / "pipeline").unet)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_path)
    base = unet_outputs(pipe.unet)
    pipe.load_lora_weights(lora_run)  # the run folder: diffusers finds pytorch_lora_weights.safetensors
    torch.testing.assert_close(unet_outputs(pipe.unet), merged, rtol=0, atol=1e-5)
    assert (base - merged).abs().max() > 1e-3  # the LoRA does something, far above the tolerance
    # the delta beside it: the merged to_k / to_v weights, bit for bit the pipeline folder's
    delta = load_file(lora_run / DELTA_FILE)
    assert delta and all(k.endswith((".attn2.to_k.weight", ".attn2.to_v.weight")) for k in delta)
    assert torch.equal(unet_outputs(unlearn.load_pipeline(tiny_pipeline_path, lora_run / DELTA_FILE).unet), merged)
    assert len(load_file(lora_run / LORA_FILE)) == 2 * len(delta)


def test_export_pipeline_alone_writes_no_lora_file(tiny_pipeline_path, tmp_path):
    run = train(tmp_path, tiny_pipeline_path, *LORA_RUN, "method.steps=1")
    assert (run / "pipeline").is_dir() and not (run / LORA_FILE).exists() and not (run / DELTA_FILE).exists()


class Stop(Exception):
    """Ends a session right after a checkpoint is written, as a kill would."""


def test_resume_from_a_lora_checkpoint_ends_where_an_uninterrupted_run_does(tiny_pipeline_path, tmp_path):
    """The checkpoint holds the LoRA tensors only; a session resumed from it after 2 of 4 iterations exports the
    same UNet as a run of 4 (it would not if the LoRA were left out of the checkpoint or not loaded back)."""
    from diffusers import UNet2DConditionModel

    from unlearn.utils.checkpoint import IterationCheckpoint

    steps = [*LORA_RUN, "method.steps=4", "+checkpoint_every=1"]
    whole = train(tmp_path / "whole", tiny_pipeline_path, *steps)
    save = IterationCheckpoint.save

    def save_then_stop(self, trainer, iteration):
        path = save(self, trainer, iteration)
        if iteration == 2:
            raise Stop(iteration)
        return path

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(IterationCheckpoint, "save", save_then_stop)
        with pytest.raises(Stop):
            train(tmp_path / "cut", tiny_pipeline_path, *steps)
    state = torch.load(tmp_path / "cut" / "run" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    unet_keys = [k for k in state if k.startswith("unet.")]
    assert unet_keys and all(".lora_" in k for k in unet_keys)
    train(tmp_path / "resumed", tiny_pipeline_path, *steps, f"resume={tmp_path / 'cut' / 'run'}")
    a = UNet2DConditionModel.from_pretrained(whole / "pipeline" / "unet").state_dict()
    b = UNet2DConditionModel.from_pretrained(tmp_path / "cut" / "run" / "pipeline" / "unet").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------ config
def gradient_methods() -> list[str]:
    """Every method config whose class trains (a new one is tested here with nothing added)."""
    from hydra.utils import get_class

    out = []
    for path in sorted((ROOT / "conf" / "method").glob("*.yaml")):
        target = compose_train(ROOT, f"method={path.stem}").method._target_  # a preset's comes from its defaults
        if not getattr(get_class(target), "closed_form", False):
            out.append(path.stem)
    return out


@pytest.mark.parametrize("method", gradient_methods())
def test_every_gradient_method_composes_and_builds_with_a_lora_on_the_toy_model(tmp_path, method):
    from hydra.utils import instantiate

    from unlearn.methods.base import TRAINABLE
    from unlearn.validate import problems

    cfg = compose_train(tmp_path, "model=toy", f"method={method}", "method.adapter=lora")
    found = problems(cfg)
    if found:  # a method that trains no UNet weight of its own (SPM: its own adapter) refuses it by name
        assert [p.key for p in found] == ["method.adapter"], [str(p) for p in found]
        return
    assert dict(cfg.method.lora) == {"rank": 4, "alpha": 4.0, "dropout": 0.0}  # conf/adapter/default.yaml
    module = instantiate(cfg.method, components=load_components("toy"), _convert_="object")
    keep = TRAINABLE[cfg.method.get("trainable", "all")]
    assert module.trainable_names and all(".lora_" in n and keep(n) for n in module.trainable_names)
    assert all(".lora_" in n for n, p in module.unet.named_parameters() if p.requires_grad)


@pytest.mark.parametrize(("overrides", "line"), [
    (["method=uce", "method.adapter=lora"], "method.adapter=lora: not for uce (UCE), a closed-form edit"),
    (["method=rece", "method.adapter=lora"], "method.adapter=lora: not for rece (RECE), a closed-form edit"),
    (["method=esd_x", "method.adapter=lora", "method.lora.rank=0"], "method.lora.rank=0: an integer >= 1"),
    (["method=conabl", "method.adapter=lora", "method.lora.dropout=1.0"], "method.lora.dropout=1.0"),
    (["method=distill", "method.adapter=dora"], "method.adapter=dora: one of none | lora"),
    (["method=distill", "+method.lora.ranks=2"], "did you mean method.lora.rank?"),
])
def test_bad_adapter_settings_are_one_line_each(tmp_path, overrides, line):
    from unlearn.validate import problems

    found = [str(p) for p in problems(compose_train(tmp_path, *overrides))]
    assert len(found) == 1 and line in found[0], found


def test_train_refuses_lora_for_a_closed_form_method_before_loading_anything(tmp_path):
    out = subprocess.run([sys.executable, "-m", "unlearn.train", "method=uce", "method.adapter=lora",
                          f"paths.root={tmp_path}"], check=False, capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert out.returncode == 2 and len(errors) == 1 and "method.adapter=lora: not for uce" in errors[0], out.stderr


def test_no_adapter_keeps_every_former_run_hash(tmp_path):
    from omegaconf import OmegaConf

    from unlearn.utils.marker import config_hash

    cfg = compose_train(tmp_path, "method=esd_x")
    data = OmegaConf.to_container(cfg)
    data["method"] = {k: v for k, v in data["method"].items() if k not in ("adapter", "lora")}
    assert config_hash(cfg) == config_hash(OmegaConf.create(data))
    OmegaConf.update(cfg, "method.adapter", "lora")
    assert config_hash(cfg) != config_hash(OmegaConf.create(data))


