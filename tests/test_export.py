"""`export=pipeline|delta|both` and `unlearn.load_pipeline(base, delta)`: a delta holds only the tensors a method
changed, with its base model's id and fingerprint; reloaded on its base it gives the exported pipeline folder's
images bit for bit; on another base it is refused naming both; evaluate, compare and attack take it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from toy_helpers import compose_train

import unlearn
from unlearn.export import DELTA_FILE, DeltaError, read_header, resolve_model

TINY_RUN = ["model=toy", "concept=toy_ring", "method.steps=2", "data.num_prompts=2", "data.images_per_prompt=2",
            "data.batch_size=2", "data.gen_batch_size=2", "model.sample_steps=2", "evaluate=false", "logger=none",
            "trainer=cpu", "trainer.enable_progress_bar=false"]
METHODS = {"uce": ["method=uce"], "distill": ["method=distill", "method.sample_steps=2"]}
PROMPTS = ["a red ring", "a blue ring in the style of stripes"]


def train(tmp_path: Path, pipeline: Path, *overrides: str) -> Path:
    from unlearn.train import run

    cfg = compose_train(tmp_path, f"model.path={pipeline}", f"paths.cache={tmp_path}/cache", *TINY_RUN, *overrides)
    run(cfg)
    return tmp_path / "run"


@pytest.fixture(scope="module")
def runs(tiny_pipeline_path, tmp_path_factory) -> dict[str, Path]:
    """A closed-form edit (UCE) and a trained method (self-distillation, 2 iterations), each exported both ways."""
    return {m: train(tmp_path_factory.mktemp(m), tiny_pipeline_path, *o, "export=both") for m, o in METHODS.items()}


def images(pipe) -> torch.Tensor:
    generator = [torch.Generator().manual_seed(s) for s in range(len(PROMPTS))]
    return pipe(PROMPTS, num_inference_steps=2, guidance_scale=3.0, generator=generator, output_type="pt").images


def folder_images(run: Path) -> torch.Tensor:
    from diffusers import StableDiffusionPipeline

    return images(StableDiffusionPipeline.from_pretrained(run / "pipeline"))


@pytest.mark.parametrize("method", list(METHODS))
def test_a_delta_on_its_base_gives_the_pipeline_folders_images_bit_for_bit(runs, tiny_pipeline_path, method):
    run = runs[method]
    rebuilt = unlearn.load_pipeline(tiny_pipeline_path, run / DELTA_FILE)
    assert torch.equal(images(rebuilt), folder_images(run))
    # and the rebuilt UNet is the exported one, every tensor; the delta holds a part of them only
    exported = load_file(run / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    state = rebuilt.unet.state_dict()
    assert exported.keys() == state.keys() and all(torch.equal(exported[k], state[k]) for k in exported)
    assert 0 < len(load_file(run / DELTA_FILE)) < len(exported)


def test_a_delta_missing_one_changed_tensor_gives_other_images(runs, tiny_pipeline_path, tmp_path):
    """The check above breaks when the delta is incomplete: one edited tensor left out, the images differ."""
    run = runs["uce"]
    tensors, meta = load_file(run / DELTA_FILE), read_header(run / DELTA_FILE)
    dropped = min(tensors)
    del tensors[dropped]
    broken = tmp_path / DELTA_FILE
    save_file(tensors, str(broken), metadata={**meta, "tensors": str(len(tensors))})
    assert not torch.equal(images(unlearn.load_pipeline(tiny_pipeline_path, broken)), folder_images(run))


@pytest.mark.parametrize(("method", "subset"), [("uce", "cross_attn_kv"), ("distill", "cross_attn")])
def test_the_metadata_names_base_fingerprint_method_and_component(runs, tiny_pipeline_path, method, subset):
    from unlearn.models.fingerprint import model_fingerprint
    from unlearn.models.loading import load_components

    meta = read_header(runs[method] / DELTA_FILE)
    names = list(load_file(runs[method] / DELTA_FILE))
    assert meta["component"] == "unet" and meta["base"] == str(tiny_pipeline_path)
    assert json.loads(meta["base_fingerprint"]) == model_fingerprint(load_components(str(tiny_pipeline_path)))
    assert meta["base_dtype"] == "float32" and meta["base_revision"] == ""
    assert meta["method"] == method and meta["method_class"].startswith("unlearn.methods.")
    assert meta["trainable"] == subset and meta["concept"] == "toy_ring"
    assert meta["tensors"] == str(len(names)) and meta["unlearn_version"] == unlearn.__version__
    if subset == "cross_attn_kv":
        assert all("attn2.to_k" in n or "attn2.to_v" in n for n in names)


def test_a_delta_on_another_base_is_refused_naming_both(runs):
    delta = runs["uce"] / DELTA_FILE
    with pytest.raises(DeltaError) as e:
        unlearn.load_pipeline("toy", delta)
    assert str(delta) in str(e.value) and "'toy'" in str(e.value) and read_header(delta)["base"] in str(e.value)


def test_a_tensor_changed_outside_the_subset_goes_into_the_delta(tiny_pipeline_path, tmp_path):
    from unlearn.export.delta import base_record, write_delta
    from unlearn.models.loading import load_components

    comps = load_components(str(tiny_pipeline_path))
    base = base_record(compose_train(tmp_path, f"model.path={tiny_pipeline_path}").model, comps)
    names = [n for n, _ in comps.unet.named_parameters() if "attn2.to_k" in n]
    with torch.no_grad():
        comps.unet.conv_in.bias.add_(1.0)  # not in the subset
    path = write_delta(tmp_path / DELTA_FILE, comps.unet, names, base)
    assert set(load_file(path)) == {*names, "conv_in.bias"}
    assert read_header(path)["trainable"] == "custom"


def test_export_delta_alone_writes_no_pipeline_and_a_run_folder_resolves_to_it(tiny_pipeline_path, tmp_path, runs):
    from unlearn.export.load import unet_of
    from unlearn.models.loading import load_components
    from unlearn.utils.labels import pipeline_label
    from unlearn.utils.marker import where_things_are

    run = train(tmp_path, tiny_pipeline_path, *METHODS["uce"], "export=delta")
    assert (run / DELTA_FILE).is_file() and not (run / "pipeline").exists() and (run / "DONE").exists()
    assert "delta.safetensors" in where_things_are(run)
    assert resolve_model(run) == ("delta", str(run / DELTA_FILE))
    assert resolve_model(runs["uce"]) == ("pipeline", str(runs["uce"] / "pipeline"))
    assert pipeline_label(run) == pipeline_label(run / DELTA_FILE) == "run"
    base = load_components(str(tiny_pipeline_path))
    unet = unet_of(run, base)  # what evaluate, compare and attack load
    exported = load_file(runs["uce"] / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(exported[k], v) for k, v in unet.state_dict().items())
    assert unet is not base.unet and not torch.equal(unet.state_dict()[next(iter(load_file(run / DELTA_FILE)))],
                                                     base.unet.state_dict()[next(iter(load_file(run / DELTA_FILE)))])
    with pytest.raises(DeltaError, match="was made from base"):
        unet_of(run, load_components("toy"))


def test_bad_export_and_a_foreign_file_are_named(tmp_path, tiny_pipeline_path):
    from unlearn.validate import ConfigError, problems, validate

    with pytest.raises(ConfigError, match="export=zip"):
        validate(compose_train(tmp_path, "export=zip"))
    not_a_delta = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(1)}, str(not_a_delta))
    found = [str(p) for p in problems(compose_train(tmp_path, f"+candidates=[{not_a_delta}]"))]
    assert any("not an unlearn delta" in p for p in found), found
    with pytest.raises(DeltaError, match="not an unlearn delta"):
        unlearn.load_pipeline(tiny_pipeline_path, not_a_delta)


def test_the_default_export_keeps_every_former_run_hash(tmp_path):
    from omegaconf import OmegaConf

    from unlearn.utils.marker import config_hash

    cfg = compose_train(tmp_path)
    former = OmegaConf.create({k: v for k, v in OmegaConf.to_container(cfg).items() if k != "export"})
    assert config_hash(cfg) == config_hash(former)
    OmegaConf.update(cfg, "export", "delta")
    assert config_hash(cfg) != config_hash(former)


def test_evaluate_takes_a_delta_and_refuses_one_of_another_base_before_measuring(runs, tiny_pipeline_path, tmp_path):
    from unlearn.evaluate import run as evaluate

    small = [f"model.path={tiny_pipeline_path}", "model=toy", "concept=toy_ring", "model.sample_steps=2",
             "eval.num_prompts=1", "eval.images_per_prompt=2", "eval.implicit=false", "eval.neighbours=false",
             "logger=none"]
    payload = evaluate(compose_train(tmp_path / "a", *small, f"+candidates=[{runs['uce'] / DELTA_FILE}]"))
    assert list(payload["results"]) == ["original", "run"]
    # a delta of the tiny model against the toy model: refused before the original's images are made
    with pytest.raises(DeltaError, match="was made from base"):
        evaluate(compose_train(tmp_path / "b", "model=toy", "concept=toy_ring", "logger=none",
                               f"+candidates=[{runs['uce'] / DELTA_FILE}]"))
    assert not (tmp_path / "b" / "run" / "eval" / "images").exists()


def test_sequential_compare_with_export_delta(tiny_pipeline_path, tmp_path):
    from unlearn.compare import compare

    args = [f"paths.root={tmp_path}", f"paths.cache={tmp_path}/cache", f"model.path={tiny_pipeline_path}",
            "recipes=none", "eval_every=0", "logger=none", "trainer=cpu", "model.sample_steps=2",
            "eval.num_prompts=1", "eval.images_per_prompt=2", "eval.implicit=false", "export=delta",
            "concepts=[toy_ring,toy_diamond]", "methods=[uce]", f"out_dir={tmp_path}/seq"]
    compare(args)
    runs = tmp_path / "seq" / "runs" / "uce"
    stage1, stage2 = runs / "stage1-toy_ring", runs / "stage2-toy_diamond"
    assert (stage1 / "pipeline").is_dir() and (stage1 / DELTA_FILE).is_file()  # the next stage's base
    assert (stage2 / DELTA_FILE).is_file() and not (stage2 / "pipeline").exists()
    assert read_header(stage2 / DELTA_FILE)["base"] == str((stage1 / "pipeline").resolve())
    tables = json.loads((tmp_path / "seq" / "sequential.json").read_text())
    assert "uce" in tables["2"]


def test_compare_side_by_side_with_export_delta_and_the_attack_columns(tiny_pipeline_path, tmp_path):
    from unlearn.compare import compare

    args = [f"paths.root={tmp_path}", f"paths.cache={tmp_path}/cache", f"model.path={tiny_pipeline_path}",
            "recipes=none", "eval_every=0", "logger=none", "trainer=cpu", "model.sample_steps=2",
            "eval.num_prompts=1", "eval.images_per_prompt=2", "eval.implicit=false", "export=delta",
            "concept=toy_ring", "methods=[uce]", f"out_dir={tmp_path}/cmp", "robustness.enabled=true",
            "robustness.attack.iterations=1", "robustness.attack.num_timesteps=1", "robustness.attack.num_prompts=2",
            "robustness.recovery.psi=[0.5]"]
    compare(args)
    run = tmp_path / "cmp" / "runs" / "uce"
    assert (run / DELTA_FILE).is_file() and not (run / "pipeline").exists()
    header, _, *rows = (tmp_path / "cmp" / "table.md").read_text().splitlines()
    assert [r.split("|")[1].strip() for r in rows] == ["original", "uce"]
    asr = [c.strip() for c in header.split("|")].index("ASR % (UnlearnDiffAtk)↓")
    assert rows[1].split("|")[asr].strip() != "–"  # the delta's model was attacked: it has an ASR


# With the dependencies installed on 2026-12-02 the folder and the delta find different adversarial tokens ("\ufffd t"
# against "st") although their UNets, text encoders, VAEs, schedulers and tokenizers are equal; the commit before
# this change fails the same way. Not strict, so a fix shows as XPASS; the refusal half still runs when it does.
@pytest.mark.xfail(reason="folder and delta attacks diverge under the current dependencies; cause not found",
                   strict=False)
def test_attack_takes_a_delta_as_its_pipeline_folder_and_refuses_another_base(runs, tiny_pipeline_path, tmp_path):
    """python -m unlearn.attack on the UCE run's delta file measures the same as on its pipeline folder."""
    import json

    from hydra import compose, initialize_config_dir

    from unlearn.attack import run
    from unlearn.export import DeltaError

    def attack(*pipelines, base=tiny_pipeline_path, name="run"):
        with initialize_config_dir(str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
            cfg = compose("attack", overrides=[
                f"model.path={base}", "model.sample_steps=2", f"paths.root={tmp_path}",
                f"paths.run_dir={tmp_path}/{name}", "attack.num_prompts=1", "attack.iterations=1",
                "attack.num_timesteps=1", "attack.filter_references=false", "recovery.enabled=false",
                "include_original=false", f"pipelines=[{','.join(map(str, pipelines))}]"])
        return json.loads(json.dumps(run(cfg)["results"], default=str))

    folder, delta = attack(runs["uce"] / "pipeline", runs["uce"] / "delta.safetensors")
    assert {k: v for k, v in folder.items() if k != "label"} == {k: v for k, v in delta.items() if k != "label"}
    with pytest.raises(DeltaError):
        attack(runs["uce"] / "delta.safetensors", base="toy", name="other")


def test_a_compare_seed_folder_is_labelled_by_method_and_seed(tmp_path):
    from unlearn.utils.labels import pipeline_label

    run = tmp_path / "runs" / "esd_x" / "seed1"
    (run / "pipeline").mkdir(parents=True)
    spm = tmp_path / "runs" / "spm" / "seed0"
    spm.mkdir(parents=True)
    (spm / "spm.safetensors").write_bytes(b"")
    assert pipeline_label(run) == pipeline_label(run / "pipeline") == "esd_x-seed1"
    assert pipeline_label(spm) == "spm-seed0"
