"""The anchor/target training set, generated once with the original model and cached on disk.

`prepare_data()` samples N = P x K images (P anchor prompts of the concept, K = images_per_prompt): image i
uses anchor prompt i % P (round-robin, so the first P images already cover every prompt) and seed `seed + i`,
drawn with `unlearn.models.generate` (DDIM, the model config's sample_steps and guidance_scale),
gen_batch_size images per shard. Its final x0 latents are what the methods train on: the sampler works in the
UNet's latent space, i.e. VAE latents already multiplied by `vae.config.scaling_factor`, so they are used as
they are (no rescaling).

Cache layout (`{cache_dir}/prepared/{model.name}/{concept.name}-{fingerprint[:12]}/`, or `folder` if set):

    manifest.json             fingerprint + the settings it hashes; written first, checked on every later use
    metadata.jsonl            one row per image: index, anchor, target, seed, shard
    shards/00000/             one directory per generation batch, written beside and renamed into place
        latents.safetensors   "latents" (G,4,h,w) float32 x0 latents, "index" (G,) image indices
        000000.png ...        the decoded images, named by image index
    embeddings.safetensors    "hidden_states" (U,T,D): text-encoder last hidden states of "" and of every
                              unique anchor and target prompt; the prompt list is in its metadata
    timing.json               how long the last generating run took (the only file that is not deterministic)

The fingerprint is a sha256 over: model path, dtype, the unet/vae/text_encoder configs, a hash of every
weight byte (unlearn/models/fingerprint.py), the tokenizer vocabulary, the anchor prompts, the derivation
and the pairs, N and the first seed, sampler steps and guidance, and the shard size. A different setting gets
a different folder, so sweeps keep all of theirs; a folder given explicitly whose manifest disagrees raises
CacheMismatchError naming the folder and each differing setting: caches are never mixed.

Resuming: a shard directory exists only once complete (atomic rename), so a rerun skips existing shards and a
complete cache generates nothing. Jobs started together on one folder (a sweep) share the work: a shard is
generated under its lock (`shards/.00000.lock`, removed after), a job skips the shards another job holds, then
waits for them (logging what it waits for) and generates any whose holder died; the manifest and the embeddings
are made under locks too. So each image is generated once, however many jobs ask for it.

Sharding across processes: shard k belongs to rank k % world_size (rank and world from torch.distributed when
initialised, else env RANK/WORLD_SIZE, else 0/1), e.g. `torchrun --nproc_per_node=4 -m unlearn.prepare ...`;
rank 0 then waits for every shard and writes the embeddings.
Inside `Trainer.fit`, Lightning calls prepare_data on one process per node, which then generates every missing
shard.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from unlearn.data.concepts import Concept, load_concept
from unlearn.data.order import ResumableBatches
from unlearn.models import encode_prompts, generate
from unlearn.models.fingerprint import model_fingerprint, sha_of
from unlearn.models.loading import load_components
from unlearn.utils.files import file_lock, lock_path, save_tensors_atomic, tmp_name, write_atomic

FORMAT_VERSION = 1
POLL_S = 5.0  # how often rank 0 looks for the other ranks' shards


class CacheMismatchError(RuntimeError):
    """A prepared-data folder made with other settings; the message names the folder and what differs."""


# ------------------------------------------------------------------------------------------------ helpers
def rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))), world


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def settings_diff(old: dict, new: dict) -> list[str]:
    old, new = _flatten(old), _flatten(new)
    return [f"{k}: {old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r}"
            for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def _cfg(cfg: Any, key: str, default: Any = None) -> Any:
    if cfg is None:
        return default
    return cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)


@dataclass
class Plan:
    """Everything the cache holds, decided before any image is drawn."""
    pairs: list[tuple[str, str]]
    anchors: list[str]  # per image
    targets: list[str]
    seeds: list[int]
    shards: list[range]
    settings: dict
    fingerprint: str
    folder: Path


class PairedLatents(Dataset):
    """Item i: the x0 latents of image i % N with its anchor/target prompts, their embeddings and its seed."""

    def __init__(self, latents: torch.Tensor, emb: torch.Tensor, anchor_rows: list[int],
                 target_rows: list[int], anchors: list[str], targets: list[str], seeds: list[int],
                 length: int):
        self.latents, self.emb = latents, emb
        self.anchor_rows, self.target_rows = anchor_rows, target_rows
        self.anchors, self.targets, self.seeds = anchors, targets, seeds
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        j = i % len(self.latents)
        return {"latents": self.latents[j], "anchor_emb": self.emb[self.anchor_rows[j]],
                "target_emb": self.emb[self.target_rows[j]], "anchor_prompt": self.anchors[j],
                "target_prompt": self.targets[j], "seed": self.seeds[j]}


# ------------------------------------------------------------------------------------------------ DataModule
class UnlearnDataModule(L.LightningDataModule):
    def __init__(self, components=None, concept: Any = None, model_cfg: Any = None, num_prompts: int = 200,
                 images_per_prompt: int = 5, batch_size: int = 8, gen_batch_size: int = 16, seed: int = 0,
                 num_workers: int = 0, cache_dir: str | os.PathLike = "cache",
                 folder: str | os.PathLike | None = None, device: str = "auto",
                 wait_timeout_s: float = 6 * 3600):
        super().__init__()
        for name, v in (("num_prompts", num_prompts), ("images_per_prompt", images_per_prompt),
                        ("batch_size", batch_size), ("gen_batch_size", gen_batch_size)):
            if int(v) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {v}")
        self._components = components
        self._concept = concept
        self.model_cfg = model_cfg
        self.num_prompts, self.images_per_prompt = int(num_prompts), int(images_per_prompt)
        self.batch_size, self.gen_batch_size = int(batch_size), int(gen_batch_size)
        self.seed, self.num_workers = int(seed), int(num_workers)
        self.cache_dir = Path(cache_dir)
        self.explicit_folder = Path(folder) if folder else None
        self.device = device
        self.wait_timeout_s = float(wait_timeout_s)
        self._plan: Plan | None = None
        self.dataset: PairedLatents | None = None
        self.uncond_emb: torch.Tensor | None = None
        self.last_prepare: dict | None = None
        self.start_batch = 0  # the first batch of the order's stream to train on (> 0 when resumed)
        self.generate = True  # False after require_prepared(): prepare_data() then generates nothing

    @classmethod
    def validate_config(cls, cfg: dict) -> list:
        """The data group's rules, checked before any model loads (unlearn/validate.py)."""
        from unlearn.validate import Problem, choice, number

        d, out = cfg["data"], []
        for key in ("num_prompts", "images_per_prompt", "batch_size", "gen_batch_size"):
            out += number(f"data.{key}", d.get(key), 1, integer=True)
        out += number("data.seed", d.get("seed"), 0, integer=True)
        out += number("data.num_workers", d.get("num_workers"), 0, integer=True)
        out += number("data.wait_timeout_s", d.get("wait_timeout_s"), 0, lo_open=True)
        device = d.get("device", "auto")
        if not (isinstance(device, str) and (device in ("auto", "cpu", "cuda") or device.startswith("cuda:"))):
            out += choice("data.device", device, ("auto", "cpu", "cuda", "cuda:<index>"))
        folder = d.get("folder")
        if folder and Path(folder).exists() and not Path(folder).is_dir():
            out.append(Problem("data.folder", folder, "null or a folder (this is a file)"))
        return out

    # ------------------------------------------------------------------ inputs
    @property
    def components(self):
        if self._components is None:
            if _cfg(self.model_cfg, "path") is None:
                raise ValueError("UnlearnDataModule needs `components` or a `model_cfg` with a `path`")
            self._components = load_components(_cfg(self.model_cfg, "path"),
                                               revision=_cfg(self.model_cfg, "revision"),
                                               dtype=_cfg(self.model_cfg, "dtype", "float32"))
        return self._components

    @property
    def concept(self) -> Concept:
        if self._concept is None:
            raise ValueError("UnlearnDataModule needs a `concept` (a name, a concept config or a Concept)")
        if not isinstance(self._concept, Concept):
            self._concept = load_concept(self._concept)
        return self._concept

    def _sampler_settings(self) -> tuple[int, float]:
        steps, scale = _cfg(self.model_cfg, "sample_steps"), _cfg(self.model_cfg, "guidance_scale")
        if steps is None or scale is None:
            raise ValueError("UnlearnDataModule needs a `model_cfg` with sample_steps and guidance_scale")
        return int(steps), float(scale)

    # ------------------------------------------------------------------ plan and fingerprint
    @property
    def plan(self) -> Plan:
        if self._plan is None:
            self._plan = self._make_plan()
        return self._plan

    @property
    def folder(self) -> Path:
        return self.plan.folder

    def _make_plan(self) -> Plan:
        concept, comps = self.concept, self.components
        steps, scale = self._sampler_settings()
        anchor_set = concept.prompts(self.num_prompts)
        pairs = concept.pairs(self.num_prompts)
        p, k = len(pairs), self.images_per_prompt
        n = p * k
        anchors = [pairs[i % p][0] for i in range(n)]
        targets = [pairs[i % p][1] for i in range(n)]
        seeds = [self.seed + i for i in range(n)]
        g = self.gen_batch_size
        shards = [range(s, min(s + g, n)) for s in range(0, n, g)]
        settings = {
            "format": FORMAT_VERSION,
            "model": {"path": str(_cfg(self.model_cfg, "path", comps.source)), **model_fingerprint(comps)},
            "anchor_prompts": {"spec": concept.anchor_prompts, "sha": sha_of(anchor_set)},
            "derive": dict(concept.derive),
            "pairs_sha": sha_of(pairs),
            "num_prompts": p, "images_per_prompt": k, "num_images": n, "seed": self.seed,
            "sample_steps": steps, "guidance_scale": scale,
            "shard_size": g,
        }
        fingerprint = sha_of(settings)
        model_name = str(_cfg(self.model_cfg, "name", "model"))
        folder = self.explicit_folder or \
            self.cache_dir / "prepared" / model_name / f"{concept.name}-{fingerprint[:12]}"
        return Plan(pairs, anchors, targets, seeds, shards, settings, fingerprint, folder)

    # ------------------------------------------------------------------ cache files
    def _shard_dir(self, k: int) -> Path:
        return self.folder / "shards" / f"{k:05d}"

    def missing_shards(self) -> list[int]:
        return [k for k in range(len(self.plan.shards)) if not self._shard_dir(k).is_dir()]

    def is_complete(self) -> bool:
        return (self.folder / "manifest.json").exists() and not self.missing_shards() \
            and (self.folder / "embeddings.safetensors").exists()

    def check_manifest(self) -> bool:
        """False if the folder has no manifest yet; CacheMismatchError if it was made with other settings."""
        plan, path = self.plan, self.folder / "manifest.json"
        if not path.exists():
            return False
        try:
            manifest = json.loads(path.read_text())
            old_fp, old_settings = manifest["fingerprint"], manifest["settings"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CacheMismatchError(f"prepared-data folder {self.folder} has an unreadable manifest.json "
                                     f"({type(e).__name__}: {e}); delete the folder to prepare it again"
                                     ) from e
        if old_fp != plan.fingerprint:
            diff = settings_diff(old_settings, plan.settings) or ["(same settings, other fingerprint scheme)"]
            raise CacheMismatchError(
                f"prepared-data folder {self.folder} was made with other settings, refusing to mix them: "
                + "; ".join(diff) + f" (fingerprint {old_fp[:12]} != {plan.fingerprint[:12]}). Delete the "
                "folder, or leave data.folder unset so that every setting gets its own folder.")
        return True

    def _init_folder(self) -> None:
        plan, folder = self.plan, self.folder
        if self.check_manifest() and (folder / "metadata.jsonl").exists() and (folder / "shards").is_dir():
            return  # made already: no lock taken, so a complete cache may be read-only
        folder.mkdir(parents=True, exist_ok=True)
        # Under a lock: a job started with another must never take its half-written folder for a foreign one.
        with file_lock(lock_path(folder / "manifest.json"), f"the manifest of {folder}",
                       timeout_s=self.wait_timeout_s):
            self._write_manifest(plan, folder)

    def _write_manifest(self, plan: Plan, folder: Path) -> None:
        if not self.check_manifest():
            foreign = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
            if foreign:
                raise CacheMismatchError(f"prepared-data folder {folder} has no manifest.json but holds "
                                         f"{', '.join(foreign[:5])}: refusing to mix; use an empty folder")
            manifest = {"fingerprint": plan.fingerprint, "concept": self.concept.name,
                        "settings": plan.settings}
            write_atomic(folder / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        meta = folder / "metadata.jsonl"
        if not meta.exists():
            rows = [json.dumps({"index": i, "anchor": plan.anchors[i], "target": plan.targets[i],
                                "seed": plan.seeds[i], "shard": i // self.gen_batch_size}, ensure_ascii=False)
                    for i in range(len(plan.seeds))]
            write_atomic(meta, "\n".join(rows) + "\n")
        (folder / "shards").mkdir(exist_ok=True)

    def _claim_shard(self, k: int, wait: bool) -> int | None:
        """Generate shard k unless it exists, holding its lock; returns the images generated, or None when another
        job holds the lock and `wait` is False."""
        with file_lock(lock_path(self._shard_dir(k)), f"shard {k} of {self.folder}", wait=wait,
                       timeout_s=self.wait_timeout_s) as held:
            if not held:
                return None
            if self._shard_dir(k).is_dir():  # finished by another job since we listed the missing ones
                return 0
            self._write_shard(k)
            return len(self.plan.shards[k])

    def _write_shard(self, k: int) -> None:
        from PIL import Image
        from safetensors.torch import save_file

        plan, final = self.plan, self._shard_dir(k)
        idx = list(plan.shards[k])
        steps, scale = self._sampler_settings()
        images, latents = generate(self.components, [plan.anchors[i] for i in idx],
                                   [plan.seeds[i] for i in idx], steps=steps, guidance_scale=scale,
                                   return_latents=True)
        pixels = (images.float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        tmp = tmp_name(final)
        try:
            tmp.mkdir(parents=True)
            for j, i in enumerate(idx):
                Image.fromarray(np.ascontiguousarray(pixels[j])).save(tmp / f"{i:06d}.png")
            save_file({"latents": latents.float().cpu().contiguous(),
                       "index": torch.tensor(idx, dtype=torch.long)}, str(tmp / "latents.safetensors"))
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # another writer of this shard (multi-node) finishing first is fine
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _write_embeddings(self) -> None:
        prompts = list(dict.fromkeys(["", *self.plan.anchors, *self.plan.targets]))
        comps = self.components
        emb = encode_prompts(comps.tokenizer, comps.text_encoder, prompts).float().cpu().contiguous()
        # One metadata key only: safetensors writes a multi-key metadata map in no fixed order.
        save_tensors_atomic({"hidden_states": emb}, self.folder / "embeddings.safetensors",
                            metadata={"prompts": json.dumps(prompts, ensure_ascii=False)})

    def _wait_for_shards(self) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
        deadline = time.monotonic() + self.wait_timeout_s
        while missing := self.missing_shards():
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank 0 waited {self.wait_timeout_s:.0f} s for shards {missing[:10]} of "
                                   f"{self.folder}; rerun prepare to resume")
            time.sleep(POLL_S)

    def _generation_device(self) -> torch.device:
        if self.device != "auto":
            return torch.device(self.device)
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")

    @contextlib.contextmanager
    def _on_generation_device(self):
        """Move unet/vae/text_encoder to the generation device for the block, then back where they were."""
        comps, device = self.components, self._generation_device()
        parts = [getattr(comps, m) for m in ("unet", "vae", "text_encoder")]
        before = [next(p.parameters()).device for p in parts]
        for p in parts:
            p.to(device)
        try:
            yield
        finally:
            for p, d in zip(parts, before):
                p.to(d)

    def require_prepared(self) -> None:
        """`prepare: false`: train on the prepared set as it is, and never generate into it (Lightning's fit()
        calls prepare_data all the same: the flag stops it there). An incomplete set is a CacheMismatchError."""
        self.generate = False
        if self.is_complete():
            return
        self.check_manifest()  # a folder made with other settings says so itself
        missing = len(self.missing_shards())
        what = f"{missing} of {len(self.plan.shards)} shards missing" if missing else "no embeddings"
        raise CacheMismatchError(f"prepare=false: the prepared set {self.folder} is incomplete ({what}); run "
                                 "python -m unlearn.prepare with the same config first, or prepare=true")

    # ------------------------------------------------------------------ Lightning hooks
    def prepare_data(self) -> dict:
        """Generate whatever the cache lacks (see the module docstring); returns a summary dict."""
        from tqdm.auto import tqdm

        if not self.generate:
            return {"folder": str(self.folder), "images": len(self.plan.seeds), "generated": 0,
                    "reused": len(self.plan.seeds)}

        t0 = time.perf_counter()
        plan = self.plan
        # Lightning calls this hook on one process per node: that process does the whole job.
        rank, world = (0, 1) if self.trainer is not None else rank_world()
        self._init_folder()
        missing = self.missing_shards()
        reused = len(plan.seeds) - sum(len(plan.shards[k]) for k in missing)
        todo = [k for k in missing if k % world == rank]
        generated, gen_s = 0, 0.0
        needs_emb = rank == 0 and not (self.folder / "embeddings.safetensors").exists()
        if todo or needs_emb:
            with self._on_generation_device():
                t1 = time.perf_counter()
                bar = tqdm(todo, desc=f"prepare {self.concept.name} (rank {rank}/{world})", unit="shard",
                           disable=not todo)
                elsewhere = []  # shards that another job is generating now
                for k in bar:
                    n = self._claim_shard(k, wait=False)
                    if n is None:
                        elsewhere.append(k)
                    else:
                        generated += n
                    bar.set_postfix(images=generated)
                for k in elsewhere:  # wait for each; one whose job died unfinished is generated here
                    generated += self._claim_shard(k, wait=True)
                gen_s = time.perf_counter() - t1
                if rank == 0 and world > 1:
                    self._wait_for_shards()
                if needs_emb:
                    emb = self.folder / "embeddings.safetensors"
                    with file_lock(lock_path(emb), f"the embeddings of {self.folder}",
                                   timeout_s=self.wait_timeout_s):
                        if not emb.exists():
                            self._write_embeddings()
        elif rank == 0 and world > 1:
            self._wait_for_shards()
        if rank == 0:
            for junk in self.folder.glob("shards/.*.tmp-*"):  # left by killed runs; every shard is done now
                shutil.rmtree(junk, ignore_errors=True)
            for stale in [*self.folder.glob(".*.lock"), *self.folder.glob("shards/.*.lock")]:
                with file_lock(stale, "", wait=False):  # left by a job killed after its work: taking it removes it
                    pass
        if generated:
            timing = {"rank": rank, "world_size": world, "generated_images": generated,
                      "seconds": round(gen_s, 3), "images_per_s": round(generated / max(gen_s, 1e-9), 3)}
            write_atomic(self.folder / ("timing.json" if world == 1 else f"timing.rank{rank}.json"),
                         json.dumps(timing, indent=2) + "\n")
        self.last_prepare = {"folder": str(self.folder), "images": len(plan.seeds),
                             "prompts": len(plan.pairs), "generated": generated, "reused": reused,
                             "by_others": len(plan.seeds) - reused - generated,
                             "shards": len(plan.shards), "rank": rank, "world_size": world,
                             "generation_s": round(gen_s, 3), "seconds": round(time.perf_counter() - t0, 3)}
        return self.last_prepare

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        from safetensors import safe_open

        plan = self.plan
        if not self.check_manifest() or not self.is_complete():
            no_emb = "" if (self.folder / "embeddings.safetensors").exists() else ", no embeddings"
            n = len(self.missing_shards())
            raise RuntimeError(f"prepared-data folder {self.folder} is incomplete ({n} shards missing"
                               f"{no_emb}): run prepare_data() (python -m unlearn.prepare) first")
        parts = [self._read_shard(k) for k in range(len(plan.shards))]
        latents = torch.empty((len(plan.seeds), *parts[0]["latents"].shape[1:]))
        for part in parts:
            latents[part["index"]] = part["latents"]
        path = self.folder / "embeddings.safetensors"
        with safe_open(str(path), framework="pt") as f:
            prompts = json.loads(f.metadata()["prompts"])
            emb = f.get_tensor("hidden_states")
        row = {p: i for i, p in enumerate(prompts)}
        self.uncond_emb = emb[row[""]]
        self.dataset = PairedLatents(latents, emb, [row[a] for a in plan.anchors],
                                     [row[t] for t in plan.targets], plan.anchors, plan.targets, plan.seeds,
                                     length=max(len(plan.seeds), self.batch_size))

    def _read_shard(self, k: int) -> dict:
        """A shard's latents, checked: a cut-off or altered file fails here, naming it, never mid-training."""
        from safetensors.torch import load_file

        path, idx = self._shard_dir(k) / "latents.safetensors", list(self.plan.shards[k])
        fix = f"delete {path.parent} and run again: only that shard is generated anew"
        try:
            part = load_file(str(path))
            lat, index = part["latents"], part["index"]
        except Exception as e:  # safetensors raises its own error types for a bad header
            raise CacheMismatchError(f"prepared-data file {path} is unreadable ({type(e).__name__}: "
                                     f"{str(e).splitlines()[0] if str(e) else ''}); {fix}") from e
        if lat.dim() != 4 or lat.shape[0] != len(idx) or index.tolist() != idx:
            raise CacheMismatchError(f"prepared-data file {path} holds latents {tuple(lat.shape)} for images "
                                     f"{index.tolist()[:4]}..., expected {len(idx)} latents for images "
                                     f"{idx[0]}..{idx[-1]}; {fix}")
        if not torch.isfinite(lat).all():
            raise CacheMismatchError(f"prepared-data file {path} holds non-finite latents; {fix}")
        return part

    def train_dataloader(self) -> DataLoader:
        if self.dataset is None:
            self.setup("fit")
        # At least one full batch per epoch (items repeat when N < batch_size). The order is a seeded endless
        # stream (unlearn/data/order.py) that a resumed run re-enters at the batch it stopped at; the loader's own
        # generator only seeds workers, so making it draws nothing from the global RNG that training uses.
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        batches = ResumableBatches(len(self.dataset), self.batch_size, self.seed, start=self.start_batch,
                                   rank=rank, world=world)
        return DataLoader(self.dataset, batch_sampler=batches, generator=torch.Generator().manual_seed(self.seed),
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    # ------------------------------------------------------------------ resume: where the stream stands
    def state_dict(self) -> dict:
        module = self.trainer.lightning_module if self.trainer is not None else None
        drawn = module.done_iterations if module is not None and hasattr(module, "done_iterations") else self.start_batch
        return {"batches_drawn": drawn, "seed": self.seed, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        if (state.get("seed"), state.get("batch_size")) != (self.seed, self.batch_size):
            raise ValueError(f"the checkpoint's data order (seed {state.get('seed')}, batch {state.get('batch_size')})"
                             f" is not this run's (seed {self.seed}, batch {self.batch_size})")
        self.start_batch = int(state["batches_drawn"])

    # ------------------------------------------------------------------ inspection
    def anchor_images(self, n: int = 16) -> torch.Tensor:
        """The first n prepared images, (n,3,H,W) float in [0,1] (read back from the PNGs)."""
        from PIL import Image

        n = min(n, len(self.plan.seeds))
        out = []
        for i in range(n):
            path = self._shard_dir(i // self.gen_batch_size) / f"{i:06d}.png"
            out.append(torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1))
        return torch.stack(out).float() / 255

    def anchor_grid(self, n: int = 16, nrow: int | None = None) -> torch.Tensor:
        """A (3,H',W') grid of the first n prepared images."""
        from unlearn.utils.grid import make_grid

        images = self.anchor_images(n)
        return make_grid(images, nrow=nrow or math.ceil(math.sqrt(len(images))))
