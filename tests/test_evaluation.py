"""The evaluator: numbers, table, grids, and the W&B offline run folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from unlearn.evaluation import Evaluator, format_table
from unlearn.models import load_components
from unlearn.toy.build import WEIGHTS

MODEL = OmegaConf.create({"clip": "toy", "sample_steps": 2, "guidance_scale": 3.0})
pytestmark = pytest.mark.skipif(not (WEIGHTS / "clip").exists(), reason="toy weights not built")


def small_evaluator(out: Path, **kw) -> Evaluator:
    return Evaluator("toy_ring", MODEL, out, num_prompts=2, images_per_prompt=2, implicit=False, **kw)


def test_table_layout_and_arrows():
    res = {"original": {"t": {"cs": 70.0, "ca": 95.0}, "n": {"cs": 71.0, "ca": 90.0}},
           "m": {"t": {"cs": 60.0, "ca": 10.0, "fid": 5.0}, "n": {"cs": 70.5, "ca": 88.0, "fid": 1.0}}}
    table = format_table(res, "t").splitlines()
    assert table[0].startswith("| model | t CS↓ | t CA↓ | t FID↑ | n CS↑ | n CA↑ | n FID↓")
    assert table[3].split(" | ")[3] == "5.00" and "–" in table[2]
    res["m"]["t"]["top1"] = 0.0  # after CA, with CA's arrows
    assert format_table(res, "t").splitlines()[0].startswith("| model | t CS↓ | t CA↓ | t top-1↓ | t FID↑ | n CS↑ |")
    del res["m"]["t"]["top1"]
    res["original"]["implicit"] = {"cs": 69.0, "ca": 90.0}  # erased like the target: its arrows are the target's
    assert format_table(res, "t").splitlines()[0].endswith("| implicit CS↓ | implicit CA↓ | implicit FID↑ |")


def test_measure_report_and_wandb_offline(tmp_path, tiny_pipeline_path, monkeypatch):
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    comps = load_components(str(tiny_pipeline_path))
    ev = small_evaluator(tmp_path / "eval", neighbours=False)
    ev.measure("original", comps)
    after = ev.measure("edited", comps, unet=comps.unet)
    assert abs(after["toy_ring"]["fid"]) < 1e-3  # same model, same prompts and seeds -> same images
    logger = WandbLogger(project="unlearn-test", save_dir=str(tmp_path), offline=True)
    payload = ev.report(loggers=[logger])
    logger.experiment.finish()
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["results"]["edited"]["toy_ring"]["ca"] == payload["results"]["edited"]["toy_ring"]["ca"]
    assert saved["settings"]["cs_convention"] == "clipscore" and "clip:" in saved["settings"]["fid_features"]
    assert (tmp_path / "eval" / "grid_toy_ring.png").exists()
    files = [p.relative_to(tmp_path).as_posix() for p in (tmp_path / "wandb").rglob("*") if p.is_file()]
    assert any(f.endswith(".wandb") for f in files), files
    assert any("media/table" in f and f.endswith(".table.json") for f in files), files
    assert any("media/images" in f and f.endswith(".png") for f in files), files


def test_regenerating_reuses_the_cached_images(tmp_path, tiny_pipeline_path, monkeypatch):
    import unlearn.evaluation.evaluator as ev_mod

    comps = load_components(str(tiny_pipeline_path))
    first = small_evaluator(tmp_path, neighbours=False).measure("original", comps)
    monkeypatch.setattr(ev_mod, "generate", lambda *a, **k: pytest.fail("generated again"))
    assert small_evaluator(tmp_path, neighbours=False).measure("original", comps) == first
    assert os.path.exists(tmp_path / "images" / "original" / "toy_ring.safetensors")


def test_original_images_are_shared_across_runs_by_model(tmp_path, tiny_pipeline_path, monkeypatch):
    import torch

    import unlearn.evaluation.evaluator as ev_mod

    real_generate, calls = ev_mod.generate, []
    monkeypatch.setattr(ev_mod, "generate", lambda *a, **k: calls.append(1) or real_generate(*a, **k))
    comps = load_components(str(tiny_pipeline_path))
    cache = tmp_path / "cache"
    first = small_evaluator(tmp_path / "run1", neighbours=False, cache_dir=cache).measure("original", comps)
    assert calls and list((cache / "eval" / "original").glob("toy_ring-*.safetensors"))
    n = len(calls)
    # Another run folder, same model and settings: nothing sampled, same numbers, and the run keeps its own copy.
    assert small_evaluator(tmp_path / "run2", neighbours=False, cache_dir=cache).measure("original", comps) == first
    assert len(calls) == n and (tmp_path / "run2" / "images" / "original" / "toy_ring.safetensors").exists()
    # Other weights under the same label are another model: sampled afresh, never served the first one's images.
    with torch.no_grad():
        next(comps.unet.parameters()).add_(0.5)
    small_evaluator(tmp_path / "run3", neighbours=False, cache_dir=cache).measure("original", comps)
    assert len(calls) > n and len(list((cache / "eval" / "original").glob("toy_ring-*"))) == 2


def test_implicit_prompts_with_captions_are_read_by_ca_and_plain_ones_only_by_cs(tmp_path, tiny_pipeline_path):
    from safetensors.torch import load_file

    from unlearn.data.concepts import load_concept

    raw = load_concept("toy_ring").to_dict()
    reads = [["a red ring", "a red circle"], ["a blue circle", "a blue ring"]]
    raw["implicit_prompts"] = [{"prompt": "a red hoop", "ca": reads[0]}, "a ring",
                               {"prompt": "a blue loop", "ca": reads[1]}]
    ev = Evaluator(raw, MODEL, tmp_path, num_prompts=2, images_per_prompt=2, neighbours=False)
    row = ev.measure("original", load_components(str(tiny_pipeline_path)))["implicit"]
    images = load_file(tmp_path / "images" / "original" / "implicit.safetensors")["images"]
    assert images.shape[0] == 3
    enc = ev.encoder
    img = enc.image_features(images[[0, 2]])
    t, a = enc.text_features([r[0] for r in reads]), enc.text_features([r[1] for r in reads])
    expected = 100 * ((img * t).sum(-1) > (img * a).sum(-1)).double().mean().item()
    assert row["ca"] == pytest.approx(expected) and "cs" in row
    raw["implicit_prompts"] = ["a red hoop", "a ring"]  # no captions: CS only, as for a real concept's titles
    plain = Evaluator(raw, MODEL, tmp_path / "plain", num_prompts=2, images_per_prompt=2, neighbours=False)
    assert "ca" not in plain.measure("original", load_components(str(tiny_pipeline_path)))["implicit"]


def test_top1_reads_each_image_against_the_anchor_and_every_class(tmp_path, tiny_pipeline_path):
    from safetensors.torch import load_file

    from unlearn.data.concepts import load_concept

    raw = load_concept("toy_ring").to_dict()
    ev = Evaluator(raw, MODEL, tmp_path, num_prompts=3, images_per_prompt=2, neighbours=False, implicit=False)
    row = ev.measure("original", load_components(str(tiny_pipeline_path)))["toy_ring"]
    images = load_file(tmp_path / "images" / "original" / "toy_ring.safetensors")["images"]
    enc, pairs = ev.encoder, [p for p in ev.concept.pairs(3) for _ in range(2)]
    hits = []
    for image, (anchor, target) in zip(enc.image_features(images), pairs):
        shapes = [target.replace(" ring", f" {s}") for s in ("circle", "square", "diamond", "triangle", "cross")]
        own, rivals = enc.text_features([target])[0], enc.text_features([anchor, *shapes])
        hits.append(float(image @ own > (rivals @ image).max()))
    assert row["top1"] == pytest.approx(100 * sum(hits) / len(hits))
    raw["classes"] = []  # no classes: no top-1 column
    plain = Evaluator(raw, MODEL, tmp_path / "plain", num_prompts=3, images_per_prompt=2, neighbours=False,
                      implicit=False)
    assert "top1" not in plain.measure("original", load_components(str(tiny_pipeline_path)))["toy_ring"]
