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
    found = override_problems(["method=foo", "concept=toy_stripes", "model=sd99,toy", "+experiment=toy_esd"])
    assert [str(p).split(":")[0] for p in found] == ["method=foo", "model=sd99"]


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
