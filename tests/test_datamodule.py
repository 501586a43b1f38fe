"""UnlearnDataModule on a tiny random pipeline: cache layout, reuse, resume, sharding, mismatch, batches."""

from __future__ import annotations

import hashlib
import itertools
import os
import re
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

import unlearn.data.datamodule as dm_module
from unlearn.data.concepts import CONF_DIR
from unlearn.data.datamodule import CacheMismatchError, UnlearnDataModule
from unlearn.models import encode_prompts, generate, load_components

CONF = Path(__file__).resolve().parent.parent / "conf"
# 4 images in 2 shards
SMALL = {"num_prompts": 2, "images_per_prompt": 2, "gen_batch_size": 2, "batch_size": 2}
BATCH_KEYS = {"latents", "anchor_emb", "target_emb", "anchor_prompt", "target_prompt", "seed"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run ~30x faster on one thread when the cores are busy (extra threads mostly wait)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def components(tiny_pipeline_path):
    return load_components(str(tiny_pipeline_path))


@pytest.fixture(scope="module")
def model_cfg(tiny_pipeline_path):
    return OmegaConf.create({"name": "tiny", "path": str(tiny_pipeline_path), "sample_steps": 2,
                             "guidance_scale": 3.0})


def make(components, model_cfg, cache_dir, concept="toy_stripes", **kw) -> UnlearnDataModule:
    return UnlearnDataModule(components=components, concept=concept, model_cfg=model_cfg, cache_dir=cache_dir,
                             device="cpu", **{**SMALL, **kw})


@pytest.fixture
def calls(monkeypatch):
    """Counts `generate` calls made by the datamodule (one per shard)."""
    count = {"n": 0}

    def counting(*args, **kwargs):
        count["n"] += 1
        return generate(*args, **kwargs)

    monkeypatch.setattr(dm_module, "generate", counting)
    return count


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` but the timing records."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith("timing")}


@pytest.fixture(scope="module")
def reference(components, model_cfg, tmp_path_factory):
    """An uninterrupted single-process run to compare others with."""
    dm = make(components, model_cfg, tmp_path_factory.mktemp("reference"))
    dm.prepare_data()
    return dm.folder


def test_prepare_writes_the_set_then_reuses_it(components, model_cfg, tmp_path, calls):
    dm = make(components, model_cfg, tmp_path)
    summary = dm.prepare_data()
    assert calls["n"] == 2 and summary["generated"] == 4 and summary["reused"] == 0
    folder = dm.folder
    assert folder.parent == tmp_path / "prepared" / "tiny" and folder.name.startswith("toy_stripes-")
    files = set(digest(folder))
    assert files == {"manifest.json", "metadata.jsonl", "embeddings.safetensors",
                     "shards/00000/latents.safetensors", "shards/00000/000000.png", "shards/00000/000001.png",
                     "shards/00001/latents.safetensors", "shards/00001/000002.png", "shards/00001/000003.png"}
    assert (folder / "timing.json").exists()
    rows = (folder / "metadata.jsonl").read_text().splitlines()
    assert len(rows) == 4 and '"seed": 3' in rows[3] and '"shard": 1' in rows[3]

    again = make(components, model_cfg, tmp_path)
    summary = again.prepare_data()
    assert calls["n"] == 2, "a complete cache must not generate"
    assert summary["generated"] == 0 and summary["reused"] == 4 and again.folder == folder


def test_interrupted_run_resumes_to_identical_files(components, model_cfg, tmp_path, reference, monkeypatch):
    done = []

    def fail_after_first(*args, **kwargs):
        if done:
            raise RuntimeError("killed")
        done.append(1)
        return generate(*args, **kwargs)

    monkeypatch.setattr(dm_module, "generate", fail_after_first)
    dm = make(components, model_cfg, tmp_path)
    with pytest.raises(RuntimeError, match="killed"):
        dm.prepare_data()
    assert dm.missing_shards() == [1] and not (dm.folder / "embeddings.safetensors").exists()
    # what a SIGKILL mid-shard leaves: a half-written temporary shard directory
    junk = dm.folder / "shards" / ".00001.tmp-otherhost-999"
    junk.mkdir()
    (junk / "000002.png").write_bytes(b"half")
    with pytest.raises(RuntimeError, match="incomplete"):
        make(components, model_cfg, tmp_path).setup()

    monkeypatch.setattr(dm_module, "generate", generate)
    summary = make(components, model_cfg, tmp_path).prepare_data()
    assert summary["generated"] == 2 and summary["reused"] == 2
    assert digest(dm.folder) == digest(reference)


def test_deleted_shard_is_regenerated_identically(components, model_cfg, tmp_path, reference, calls):
    dm = make(components, model_cfg, tmp_path)
    dm.prepare_data()
    for p in (dm.folder / "shards" / "00000").iterdir():
        p.unlink()
    (dm.folder / "shards" / "00000").rmdir()
    calls["n"] = 0
    make(components, model_cfg, tmp_path).prepare_data()
    assert calls["n"] == 1
    assert digest(dm.folder) == digest(reference)


def test_shards_split_across_ranks(components, model_cfg, tmp_path, reference, monkeypatch, calls):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    s1 = make(components, model_cfg, tmp_path).prepare_data()
    assert (s1["rank"], s1["world_size"], s1["generated"]) == (1, 2, 2)
    dm = make(components, model_cfg, tmp_path)
    assert dm.missing_shards() == [0] and not (dm.folder / "embeddings.safetensors").exists()
    monkeypatch.setenv("RANK", "0")
    s0 = dm.prepare_data()  # generates shard 0, finds shard 1 done, writes the embeddings
    assert s0["generated"] == 2 and calls["n"] == 2
    assert digest(dm.folder) == digest(reference)


@pytest.mark.parametrize("change", [{"sample_steps": 3}, {"guidance_scale": 5.0}])
def test_fingerprint_mismatch_names_the_folder(components, model_cfg, tmp_path, change):
    folder = tmp_path / "fixed"
    make(components, model_cfg, tmp_path, folder=folder).prepare_data()
    other = OmegaConf.merge(model_cfg, change)
    key, value = next(iter(change.items()))
    expected = re.escape(str(folder)) + ".*" + re.escape(f"{key}: {model_cfg[key]!r} -> {value!r}")
    with pytest.raises(CacheMismatchError, match=expected):
        make(components, other, tmp_path, folder=folder).prepare_data()
    # without an explicit folder, other settings simply get their own folder
    assert make(components, other, tmp_path).folder != make(components, model_cfg, tmp_path).folder


def test_foreign_folder_is_refused(components, model_cfg, tmp_path):
    (tmp_path / "stuff.txt").write_text("not a cache")
    with pytest.raises(CacheMismatchError, match=re.escape(f"{tmp_path} has no manifest.json")):
        make(components, model_cfg, tmp_path, folder=tmp_path).prepare_data()


def test_batches_have_the_documented_keys_and_values(components, model_cfg, reference):
    dm = make(components, model_cfg, reference.parent.parent.parent)
    assert dm.folder == reference
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == BATCH_KEYS
    t, d = components.tokenizer.model_max_length, components.text_encoder.config.hidden_size
    assert batch["latents"].shape == (2, 4, 8, 8) and batch["latents"].dtype == torch.float32
    assert batch["anchor_emb"].shape == batch["target_emb"].shape == (2, t, d)
    assert dm.uncond_emb.shape == (t, d)
    for a, tgt in zip(batch["anchor_prompt"], batch["target_prompt"]):
        assert tgt == a + " in the style of stripes"
    # item i is exactly what the sampler makes for (anchor prompt, seed), with that prompt's embeddings
    item = dm.dataset[3]
    assert item["seed"] == 3 and item["anchor_prompt"] == dm.plan.pairs[1][0]
    _, lat = generate(components, [item["anchor_prompt"]], [3], steps=2, guidance_scale=3.0,
                      return_latents=True)
    torch.testing.assert_close(item["latents"], lat[0])
    emb = encode_prompts(components.tokenizer, components.text_encoder, ["", item["anchor_prompt"],
                                                                         item["target_prompt"]])
    torch.testing.assert_close(torch.stack([dm.uncond_emb, item["anchor_emb"], item["target_emb"]]), emb)
    again = make(components, model_cfg, reference.parent.parent.parent)
    # the shuffle is seeded; the loader is endless, so read its first epoch (4 items, 2 batches)
    order = [b["seed"].tolist() for b in itertools.islice(again.train_dataloader(), 2)]
    assert order == [b["seed"].tolist() for b in itertools.islice(dm.train_dataloader(), 2)]
    assert sorted(s for batch in order for s in batch) == [0, 1, 2, 3]
    grid = dm.anchor_grid(4)
    assert grid.shape[0] == 3 and grid.min() >= 0 and grid.max() <= 1


def test_data_config_instantiates_with_runtime_arguments(components, model_cfg, tmp_path):
    cfg = OmegaConf.load(CONF / "data" / "default.yaml")
    cfg.cache_dir = str(tmp_path)
    dm = instantiate(cfg, components=components, concept=OmegaConf.load(CONF_DIR / "toy_ring.yaml"),
                     model_cfg=model_cfg, num_prompts=3, images_per_prompt=1)
    assert isinstance(dm, UnlearnDataModule) and dm.concept.name == "toy_ring"
    assert dm.plan.anchors == ["a red circle", "a red circle in the style of stripes",
                               "a red circle in the style of checker"]
    assert dm.plan.targets[0] == "a red ring" and dm.plan.seeds == [0, 1, 2]
    assert os.fspath(dm.folder).startswith(os.fspath(tmp_path / "prepared" / "tiny" / "toy_ring-"))


@pytest.mark.parametrize("damage", ["truncate", "nan"])
def test_corrupt_latent_file_is_named_before_training(components, model_cfg, tmp_path, reference, damage):
    """A cut-off or non-finite shard fails setup() with one message naming the file and the fix."""
    import shutil

    from safetensors.torch import load_file, save_file

    from unlearn.data.datamodule import CacheMismatchError

    folder = tmp_path / "prepared"
    shutil.copytree(reference, folder)
    bad = folder / "shards" / "00001" / "latents.safetensors"
    if damage == "truncate":
        bad.write_bytes(bad.read_bytes()[:100])
    else:
        part = load_file(bad)
        part["latents"][0, 0, 0, 0] = float("nan")
        save_file(part, bad)
    dm = make(components, model_cfg, tmp_path, folder=str(folder))
    with pytest.raises(CacheMismatchError, match=f"{bad}.*delete {bad.parent}"):
        dm.setup("fit")
