"""`model=sdxl` against what it is given, refused in one line (exit 2) before anything loads: a folder of the other
family (SD for sdxl, SDXL for sd14), a method that cannot apply (the seam: a method's `sdxl_refusal`; every method
in conf/method/ applies today), the attacks. No model is built:
the SDXL "folder" is the tiny SD one with an SDXL index and the two extra part folders, all validation reads."""

from __future__ import annotations

import json
import shutil

import pytest
from toy_helpers import compose_train


@pytest.fixture
def xl_folder(tmp_path, tiny_pipeline_path):
    folder = tmp_path / "xl_pipeline"
    shutil.copytree(tiny_pipeline_path, folder)
    index = folder / "model_index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "_class_name": "StableDiffusionXLPipeline"}))
    shutil.copytree(folder / "text_encoder", folder / "text_encoder_2")
    shutil.copytree(folder / "tokenizer", folder / "tokenizer_2")
    return folder


def found(tmp_path, *overrides, method="uce") -> list[str]:
    from unlearn.validate import problems

    cfg = compose_train(tmp_path, "concept=van_gogh", f"method={method}", "logger=none", "model.clip=toy",
                        "eval.fid_feature=clip", *overrides)
    return [str(p) for p in problems(cfg)]


def test_the_sdxl_config_names_its_model(tmp_path):
    m = compose_train(tmp_path, "model=sdxl").model
    assert (m.name, m.family, m.path, m.prediction_type) == ("sdxl", "sdxl", "stabilityai/stable-diffusion-xl-base-1.0",
                                                             "epsilon")
    assert "family" not in compose_train(tmp_path, "model=sd14").model  # one text encoder: the default family


def test_the_folder_must_be_of_the_model_configs_family(tmp_path, tiny_pipeline_path, xl_folder):
    assert found(tmp_path, "model=sdxl", f"model.path={xl_folder}") == []
    assert found(tmp_path, "model=sd14", f"model.path={tiny_pipeline_path}") == []
    (line,) = found(tmp_path, "model=sdxl", f"model.path={tiny_pipeline_path}")
    assert line == (f"model.path={tiny_pipeline_path}: an SDXL pipeline folder (StableDiffusionXLPipeline, with "
                    "text_encoder_2/ and tokenizer_2/) for model=sdxl; this one is a Stable Diffusion folder with one "
                    "text encoder: use model=sd14 (or sd2, sd2_v) for it")
    (line,) = found(tmp_path, "model=sd14", f"model.path={xl_folder}")
    assert line == (f"model.path={xl_folder}: a Stable Diffusion pipeline folder for model=sd14; this one is SDXL "
                    "(StableDiffusionXLPipeline): use model=sdxl for it")
    (line,) = found(tmp_path, "model=sd2_v", f"model.path={xl_folder}")  # the family's line, not the scheduler's
    assert line.startswith(f"model.path={xl_folder}: a Stable Diffusion pipeline folder for model=sd2_v; this one is SDXL")
    shutil.rmtree(xl_folder / "tokenizer_2")
    (line,) = found(tmp_path, "model=sdxl", f"model.path={xl_folder}")
    assert line.startswith(f"model.path={xl_folder}: a pipeline folder or a Hub id; model folder '{xl_folder}' has no "
                           "tokenizer_2/ (an SDXL pipeline folder needs")


def test_float16_is_refused_for_sdxl(tmp_path):
    assert found(tmp_path, "model=sdxl", "model.dtype=float16") == [
        "model.dtype=float16: bfloat16 or float32 for SDXL: its VAE overflows in float16"]
    assert found(tmp_path, "model=sdxl", "model.dtype=bfloat16") == []


WHY = "it reads one text encoder"  # a refusal, given to a method here: none of conf/method/ has one


def refusing(monkeypatch, method: str):
    from unlearn.methods.advunlearn import AdvUnlearn
    from unlearn.methods.spm import SPM

    monkeypatch.setattr({"advunlearn": AdvUnlearn, "spm": SPM}[method], "sdxl_refusal", WHY)


@pytest.mark.parametrize("method", ["advunlearn", "spm"])
def test_a_method_that_cannot_apply_is_refused_by_name(tmp_path, xl_folder, monkeypatch, method):
    refusing(monkeypatch, method)
    assert found(tmp_path, "model=sd14", method=method) == []
    assert found(tmp_path, "model=sdxl", method=method) == [f"method={method}: cannot run on model=sdxl: {WHY}"]
    assert found(tmp_path, "model=sdxl", f"model.path={xl_folder}", method=method) == [
        f"method={method}: cannot run on model=sdxl: {WHY}"]


@pytest.mark.parametrize("method", ["esd_x", "esd_u", "conabl", "distill", "sdd", "cdc_cpg", "uce", "rece", "salun",
                                    "spm", "advunlearn"])
def test_the_methods_that_apply_pass(tmp_path, xl_folder, method):
    assert found(tmp_path, "model=sdxl", method=method) == []
    assert found(tmp_path, "model=sdxl", f"model.path={xl_folder}", method=method) == []


def test_the_attacks_are_refused_on_sdxl(tmp_path):
    from unlearn.cli import compose, with_paths
    from unlearn.validate import problems

    cfg = compose("attack", with_paths([f"paths.root={tmp_path}", "model=sdxl", "concept=van_gogh", "model.clip=toy"]))
    (line,) = [str(p) for p in problems(cfg)]
    assert line == ("attack=UnlearnDiffAtk: cannot run on model=sdxl: the attacks optimise one text encoder's token "
                    "embeddings, and SDXL conditions on two")
    ok = compose("compare", with_paths([f"paths.root={tmp_path}", "model=sdxl", "concept=van_gogh", "model.clip=toy"]))
    assert not [p for p in problems(ok) if p.key == "robustness"]  # robustness columns off: nothing to refuse


def test_a_refused_method_on_sdxl_fails_in_one_line_before_anything(tmp_path, capsys, monkeypatch):
    """The entry points' first step (unlearn.cli.preflight, as `python -m unlearn.train ...` runs it)."""
    from unlearn.cli import preflight

    refusing(monkeypatch, "advunlearn")
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    with pytest.raises(SystemExit) as stop:
        preflight(["model=sdxl", "model.clip=toy", "eval.fid_feature=clip", "concept=van_gogh", "method=advunlearn",
                   f"paths.run_dir={run_dir}", f"paths.root={tmp_path}", f"paths.cache={cache}"], "train",
                  "unlearn.train")
    assert stop.value.code == 2
    want = f"error: method=advunlearn: cannot run on model=sdxl: {WHY}"
    assert capsys.readouterr().err.strip().splitlines() == [want]
    assert not run_dir.exists() and not cache.exists()
