"""Validation before work: every bad value is one line naming key, value and what is allowed; nothing is loaded,
generated or left behind (unlearn/validate.py and each class's `validate_config`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from toy_helpers import compose_train as compose_cfg

from unlearn.utils import resolvers
from unlearn.validate import Problem, number, override_problems, problems

resolvers.register()  # conf/logger/wandb.yaml's ${sweep_group:}

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# (overrides, the key that must be named, the value as it must be printed)
BAD = [
    # the command lines
    (["method.lam=-1"], "method.lam", "-1"),
    (["method.warmup_steps=500", "method.steps=100"], "method.warmup_steps", "500"),
    (["method.lr=-1e-4"], "method.lr", "-0.0001"),
    (["method.lr=fast"], "method.lr", "fast"),
    (["method=distill", "method.ema_decay=1.5"], "method.ema_decay", "1.5"),
    (["method=distill", "method.loss=kl"], "method.loss", "kl"),
    (["method.steps=0"], "method.steps", "0"),
    (["method.granularity=row"], "method.granularity", "row"),
    (["method.trainable=everything"], "method.trainable", "everything"),
    (["eval.cs_convention=hessel2"], "eval.cs_convention", "hessel2"),
    (["eval.prompts=none"], "eval.prompts", "none"),
    (["resume=/nonexistent/last.ckpt"], "resume", "/nonexistent/last.ckpt"),
    # more
    (["data.batch_size=0"], "data.batch_size", "0"),
    (["data.images_per_prompt=0"], "data.images_per_prompt", "0"),
    (["data.device=tpu"], "data.device", "tpu"),
    (["trainer.devices=0"], "trainer.devices", "0"),
    (["trainer.accelerator=tpux"], "trainer.accelerator", "tpux"),
    (["eval.num_prompts=0"], "eval.num_prompts", "0"),
    (["eval.fid_feature=inceptionv3"], "eval.fid_feature", "inceptionv3"),
    (["method=distill", "method.loss=cw", "data.batch_size=1"], "data.batch_size", "1"),
    (["method=distill", "method.sample_steps=0"], "method.sample_steps", "0"),
    (["method.retain=all"], "method.retain", "all"),
    (["method.d_input=x1"], "method.d_input", "x1"),
    (["method.betas=[0.9,1.5]"], "method.betas", "[0.9,1.5]"),
    (["method.discriminator.norm=layer"], "method.discriminator.norm", "layer"),
    (["+method.lamda=1"], "method.lamda", "1"),
    (["seed=-1"], "seed", "-1"),
    (["eval_every=-5"], "eval_every", "-5"),
    # every group: model, speed, logger, trainer keys, a method whose __init__ takes **kwargs
    (["method=rece", "+method.lamdb=1"], "method.lamdb", "1"),
    (["+trainer.max_stepz=3"], "trainer.max_stepz", "3"),
    (["+trainer.max_steps=3"], "trainer.max_steps", "3"),
    (["model.revision=nope"], "model.revision", "nope"),
    (["model.dtype=fp8"], "model.dtype", "fp8"),
    (["model.path=/nowhere/sd"], "model.path", "/nowhere/sd"),
    (["+model.foo=1"], "model.foo", "1"),
    (["speed.compile=maybe"], "speed.compile", "maybe"),
    (["speed.attention=flash"], "speed.attention", "flash"),
    (["speed.compile_mode=fastest"], "speed.compile_mode", "fastest"),
    (["logger=wandb", "logger.0.project=[1,2]"], "logger.0.project", "[1,2]"),
    (["+candidates=[/nowhere/pipeline]"], "candidates", "/nowhere/pipeline"),
]


def test_every_default_config_is_valid(tmp_path):
    for method in sorted(p.stem for p in (CONF / "method").glob("*.yaml")):
        assert problems(compose_cfg(tmp_path, f"method={method}")) == [], method
    for exp in sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")):
        assert problems(compose_cfg(tmp_path, f"experiment={exp}")) == [], exp


@pytest.mark.parametrize("overrides,key,value", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_value_is_one_line_naming_it(tmp_path, overrides, key, value):
    found = problems(compose_cfg(tmp_path, *overrides))
    assert [(p.key, str(p).split(": ")[0]) for p in found] == [(key, f"{key}={value}")], found
    assert "\n" not in str(found[0]) and found[0].allowed


def test_several_bad_values_give_one_line_each(tmp_path):
    found = problems(compose_cfg(tmp_path, "method.lam=-1", "data.batch_size=0", "eval.prompts=none"))
    assert sorted(p.key for p in found) == ["data.batch_size", "eval.prompts", "method.lam"]


def test_a_method_without_rules_is_still_checked(tmp_path):
    """A method class that defines no `validate_config` gets its signature's rules and its own __init__ checks."""
    import types

    from unlearn.validate import group_problems

    class Bare:  # no rules of its own: __init__ checks its arguments first, then uses the model
        def __init__(self, components, name: str = "bare", steps: int = 10, rate: float = 0.1, mode: str = "a"):
            if mode not in ("a", "b"):
                raise ValueError(f"unknown mode={mode!r}; choose a or b")
            components.unet  # noqa: B018 - the first use of the model

    module = types.ModuleType("bare_method_for_test")
    module.Bare = Bare
    sys.modules[module.__name__] = module
    try:
        def check(**m):
            return group_problems({"method": {"_target_": "bare_method_for_test.Bare", **m}}, "method")

        assert check(name="bare", steps=3, rate=0.5, mode="b") == []
        assert [str(p) for p in check(rate="fast")] == ["method.rate=fast: a number"]
        assert [p.key for p in check(rat=1.0)] == ["method.rat"]
        (p,) = check(mode="c")
        assert p.key == "method" and "mode='c'" in p.allowed
    finally:
        del sys.modules[module.__name__]


def test_number_rule_against_explicit_bounds():
    assert number("k", 0.5, 0, 1) == [] and number("k", 1, 0, 1, hi_open=True) != []
    assert number("k", True, 0) != [] and number("k", float("nan")) != [] and number("k", None, optional=True) == []
    assert number("k", 2.0, integer=True) == [Problem("k", 2.0, "an integer")]


def test_unknown_group_choice_is_one_line():
    found = override_problems(["method=foo", "concept=toy_stripes", "model=sd99,toy", "+experiment=toy_esd",
                               "experiment=sweep/toy_cdc_lr", "experiment=sweep/nope"])
    assert [str(p).split(":")[0] for p in found] == ["method=foo", "model=sd99", "experiment=sweep/nope"]


def test_resume_paths(tmp_path):
    run = tmp_path / "old"
    (run / "checkpoints").mkdir(parents=True)
    (p,) = problems(compose_cfg(tmp_path, f"resume={run}"))
    assert p.key == "resume" and "no checkpoints/last.ckpt" in p.allowed
    (run / "checkpoints" / "last.ckpt").write_bytes(b"PK\x03\x04 cut off")
    (p,) = problems(compose_cfg(tmp_path, f"resume={run}"))
    assert "not a readable torch checkpoint" in p.allowed


# ------------------------------------------------------------------------------------------------ through the CLI
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("args,named", [
    (["method.lam=-1"], "method.lam=-1"),
    (["method=distill", "method.loss=kl"], "method.loss=kl"),
    (["method=nosuch"], "method=nosuch"),
])
def test_cli_exits_2_with_one_line_and_leaves_nothing(tmp_path, args, named):
    run_dir = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "unlearn.train", *args, f"hydra.run.dir={run_dir}",
                        f"paths.root={tmp_path}"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300,
                       check=False)
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {named}: "), r.stderr
    assert not run_dir.exists() and not (tmp_path / "cache").exists()


# ------------------------------------------------------------------------------------------------ closest key
def test_a_kwargs_method_takes_only_its_own_and_its_base_settings(tmp_path):
    """RECE's `**uce` go to UCE: a key neither takes is refused, with the closest one named."""
    (p,) = problems(compose_cfg(tmp_path, "method=rece", "+method.lamdb=1"))
    assert str(p) == "method.lamdb=1: not a setting of RECE; did you mean method.lamb?"
    assert problems(compose_cfg(tmp_path, "method=rece", "method.erase_scale=2.0")) == []  # UCE's own setting


def test_command_line_keys_against_the_config(tmp_path):
    from unlearn.cli import compose, key_problem, with_paths

    base = compose("train", with_paths([f"paths.root={tmp_path}", "logger=wandb"]))
    said = {o: key_problem(base, o) for o in ("method.lamdb=1", "trainer.max_stepz=3", "logger.project=[1,2]",
                                               "+method.lam=1", "+model.foo=1", "~model.nope", "methd.lam=1")}
    assert str(said["method.lamdb=1"]) == "method.lamdb=1: not a setting of CDCCPG; did you mean method.lam?"
    assert "did you mean trainer.max_steps? unlearn.train sets it: use method.steps" in str(
        said["trainer.max_stepz=3"])
    assert "logger is a list" in str(said["logger.project=[1,2]"]) and "logger.0.project" in str(
        said["logger.project=[1,2]"])
    assert "drop the +" in str(said["+method.lam=1"])
    assert str(said["+model.foo=1"]).startswith("model.foo=1: not a setting of model")
    assert "no such key" in str(said["~model.nope"])
    assert "did you mean method?" in str(said["methd.lam=1"])
    # left to the class's signature (it may take **kwargs), to cfg.get, to Hydra
    for fine in ("method.lam=2", "+method.anything=1", "+checkpoint_every=2", "hydra.run.dir=x", "method=uce"):
        assert key_problem(base, fine) is None, fine


# ------------------------------------------------------------------------------------------------ the world
def test_a_concept_needs_a_model_of_its_world(tmp_path):
    (p,) = problems(compose_cfg(tmp_path, "concept=van_gogh"))
    assert p.key == "concept" and str(p).startswith("concept=van_gogh: needs a real model: add model=sd14")
    (p,) = problems(compose_cfg(tmp_path, "model=sd14", "concept=toy_ring", "eval.fid_feature=clip"))
    assert p.key == "concept" and "add model=toy" in p.allowed
    (p,) = problems(compose_cfg(tmp_path, "concept=toy2_ring"))  # the v2 world's concept on v1's model
    assert p.key == "concept" and "add model=toy2" in p.allowed and "toy world's" in p.allowed
    # A folder's world is not known: any concept (a trained toy pipeline, a local copy of SD-1.4)
    folder = tmp_path / "pipe"
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        (folder / sub).mkdir(parents=True)
    assert problems(compose_cfg(tmp_path, "concept=van_gogh", f"model.path={folder}")) == []


def fake_cache(root: Path, repo: str, file: str) -> None:
    """The Hugging Face cache's layout for one file of `repo` at its main branch."""
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("abc123")
    (folder / "snapshots" / "abc123").mkdir(parents=True)
    (folder / "snapshots" / "abc123" / file).write_text("{}")


def test_a_hub_model_out_of_reach_fails_naming_it_and_the_two_ways(tmp_path, monkeypatch):
    import huggingface_hub
    import huggingface_hub.constants as hub_constants

    from unlearn.validate import reach_problems

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    cfg = {"model": {"path": "CompVis/stable-diffusion-v1-4", "clip": "openai/clip-vit-large-patch14"}}
    (p,) = reach_problems(cfg)
    assert p.key == "model.path" and p.value == "CompVis/stable-diffusion-v1-4"
    assert "HF_HUB_OFFLINE=1" in p.allowed and "model.path=<folder>" in p.allowed and "download" in p.allowed
    fake_cache(tmp_path / "hub", "CompVis/stable-diffusion-v1-4", "model_index.json")
    (p,) = reach_problems(cfg)  # the model is there now; its CLIP is not
    assert p.key == "model.clip" and "model.clip=<folder>" in p.allowed
    fake_cache(tmp_path / "hub", "openai/clip-vit-large-patch14", "config.json")
    assert reach_problems(cfg) == []

    def unreachable(*args, **kwargs):
        raise ConnectionError("no route")

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", unreachable)
    (p,) = reach_problems({"model": {"path": "someone/elsewhere", "clip": "toy"}})
    assert "unreachable" in p.allowed and "model.path=<folder>" in p.allowed


def test_inception_fid_falls_back_to_clip_without_the_extra(tmp_path, monkeypatch):
    import importlib.util

    from unlearn.cli import fid_fallback

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    cfg = compose_cfg(tmp_path, "model=sd14", "concept=van_gogh")
    assert fid_fallback(cfg, ["model=sd14"]) == ["eval.fid_feature=clip"] and cfg.eval.fid_feature == "clip"
    cfg = compose_cfg(tmp_path, "model=sd14", "eval.fid_feature=inception")
    assert fid_fallback(cfg, ["eval.fid_feature=inception"]) == []  # asked for by name: refused, not replaced


# ------------------------------------------------------------------------------------------------ every entry point
def run_module(module: str, *args: str, cwd: Path = ROOT, env: dict | None = None):
    return subprocess.run([sys.executable, "-m", f"unlearn.{module}", *args], cwd=cwd, env=env or ENV,
                          capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.parametrize("module,group", [("train", "method"), ("prepare", "concept"), ("evaluate", "eval"),
                                          ("compare", "recipes"), ("attack", "attack")])
def test_help_answers_on_every_entry_point(module, group):
    r = run_module(module, "--help")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert f"usage: python -m unlearn.{module}" in r.stdout
    assert any(line.split()[:1] == [group] and "*" in line for line in r.stdout.splitlines()), r.stdout


@pytest.mark.parametrize("module,args,line", [
    ("train", ["method.lamdb=1"], "method.lamdb=1: not a setting of CDCCPG; did you mean method.lam?"),
    ("train", ["trainer.max_stepz=3"], "trainer.max_stepz=3: not a setting of Trainer; did you mean trainer.max_steps?"),
    ("train", ["trainer.gradient_clip_va=1"], "trainer.gradient_clip_va=1: not a setting of Trainer; did you mean +"),
    ("train", ["logger=wandb", "logger.project=[1,2]"], "logger.project=[1,2]: logger is a list"),
    ("prepare", ["data.batch_sise=2"], "data.batch_sise=2: not a setting of UnlearnDataModule; did you mean "),
    ("evaluate", ["eval.num_promptz=2"], "eval.num_promptz=2: not a setting of Evaluator; did you mean eval.num_prompts?"),
    ("compare", ["methods=[uce]", "method.lamdb=1"], "method.lamdb=1: not a setting of"),
    ("attack", ["attack.kk=3"], "attack.kk=3: not a setting of UnlearnDiffAtk; did you mean attack.k?"),
    ("train", ["concept=van_gogh", "method=cdc_cpg"], "concept=van_gogh: needs a real model: add model=sd14"),
])
def test_a_bad_command_line_is_one_line_exit_2_on_every_entry_point(tmp_path, module, args, line):
    r = run_module(module, *args, f"hydra.run.dir={tmp_path}/run", f"paths.root={tmp_path}", cwd=tmp_path) \
        if module != "compare" else run_module(module, *args, f"paths.root={tmp_path}", cwd=tmp_path)
    errors = [x for x in r.stderr.splitlines() if x.startswith("error: ")]
    assert r.returncode == 2 and len(errors) == 1 and errors[0].startswith(f"error: {line}"), r.stderr
    assert "Traceback" not in r.stderr and list(tmp_path.iterdir()) == []


def test_sd14_out_of_reach_fails_in_seconds_with_nothing_written(tmp_path):
    import importlib.util
    import time

    env = {**ENV, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    start = time.monotonic()
    r = run_module("train", "model=sd14", "concept=van_gogh", f"hydra.run.dir={tmp_path}/run",
                   f"paths.root={tmp_path}", cwd=tmp_path, env=env)
    assert time.monotonic() - start < 60  # seconds, not a download's timeout (15 s on an idle machine)
    (error,) = [x for x in r.stderr.splitlines() if x.startswith("error: ")]
    assert r.returncode == 2 and error.startswith("error: model.path=CompVis/stable-diffusion-v1-4: "), r.stderr
    assert "model.path=<folder>" in error and "download" in error
    assert importlib.util.find_spec("torch_fidelity") or "warning: FID on CLIP features" in r.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("override,line", [
    ("attack.k=0", "attack.k=0: the number of adversarial tokens must be an integer >= 1"),
    ("attack.iterations=-1", "attack.iterations=-1: must be an integer >= 0"),
    ("detector.threshold=1.5", "detector.threshold=1.5: a number in [0, 1]"),
    ("detector.name=hf", "detector.name=hf: needs detector.path"),
    ("detector.name=yolo", "detector.name=yolo: one of auto | nudenet | clip | hf"),
    ("recovery.psi=[0.5,1.5]", "recovery.psi=[0.5,1.5]: a non-empty list of numbers in (0, 1)"),
    ("pipelines=[/nowhere/pipeline]", "pipelines=/nowhere/pipeline: each a pipeline folder"),
])
def test_the_attack_groups_are_checked(tmp_path, override, line):
    from unlearn.cli import compose, with_paths

    (p,) = problems(compose("attack", with_paths([f"paths.root={tmp_path}", override])))
    assert str(p).startswith(line), p
