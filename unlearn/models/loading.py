"""Load Stable-Diffusion-format components with diffusers/transformers, and save the result as a pipeline folder.

The same code loads `CompVis/stable-diffusion-v1-4` from the Hub and the built-in toy model from disk; a trained
UNet is saved with the untouched components as a folder that `StableDiffusionPipeline.from_pretrained` loads. An
SDXL folder (its model_index.json says StableDiffusionXLPipeline) loads as the same Components, its two text encoders
and tokenizers paired and its UNet taking packed embeddings (unlearn/models/sdxl.py), and is saved as a
StableDiffusionXLPipeline folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
TOY_PIPELINE = Path(__file__).resolve().parent.parent / "toy" / "weights" / "pipeline"  # = BUILT_IN["toy"] / "pipeline"


class ModelLoadError(RuntimeError):
    """A model path/id that cannot be loaded; the message names it and the part that failed."""


@dataclass
class Components:
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    source: str

    def pipeline(self, unet=None):
        """A StableDiffusionPipeline (SDXL: StableDiffusionXLPipeline) over these components (optionally with another
        UNet)."""
        from diffusers import StableDiffusionPipeline

        from unlearn.models import sdxl

        if isinstance(self.text_encoder, sdxl.TextEncoders):
            return sdxl.pipeline(self, unet)

        pipe = StableDiffusionPipeline(
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=unet or self.unet,
            scheduler=self.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe


def resolve_path(path: str | os.PathLike) -> str:
    """`toy` / `toy2` name the built-in models; an existing folder is used as is; anything else is a hub id."""
    from unlearn.toy import built_in

    folder = built_in(path)
    return str(folder / "pipeline") if folder is not None else str(path)


def _looks_local(path: str) -> bool:
    """Hub ids are `owner/name`; anything absolute, relative-dotted, deeper or existing is a folder."""
    return path.startswith((".", "/", "~")) or path.count("/") != 1 or Path(path).expanduser().exists()


def check_folder(path: str) -> None:
    from unlearn.models import sdxl

    p = Path(path).expanduser()
    if not p.exists():
        raise ModelLoadError(f"model path {path!r} does not exist")
    xl = sdxl.is_sdxl_folder(path)
    needed = SUBFOLDERS + (sdxl.SUBFOLDERS if xl else ())
    missing = [s for s in needed if not (p / s).is_dir()]
    if missing:
        kind = "an SDXL" if xl else "a Stable Diffusion"
        raise ModelLoadError(f"model folder {path!r} has no {', '.join(s + '/' for s in missing)} "
                             f"({kind} pipeline folder needs {', '.join(needed)})")


def load_components(path: str, revision: str | None = None, dtype: str | torch.dtype = "float32",
                    scheduler: str | None = None) -> Components:
    """Load unet, vae, text_encoder, tokenizer and scheduler from a pipeline folder or hub id (SDXL: also
    text_encoder_2 and tokenizer_2, paired with the first ones: unlearn/models/sdxl.py).

    Every failure is re-raised as ModelLoadError naming `path` and the component.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from unlearn.models import sdxl

    path = resolve_path(path)
    if _looks_local(path):
        check_folder(path)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    kw = {"revision": revision} if revision else {}
    loaders = {
        "unet": lambda: UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype, **kw),
        "vae": lambda: AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype, **kw),
        "text_encoder": lambda: CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype, **kw),
        "tokenizer": lambda: CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **kw),
        # DDIM with the model's own training schedule: deterministic sampling for data and evaluation.
        "scheduler": lambda: DDIMScheduler.from_pretrained(path, subfolder="scheduler", **kw),
    }
    xl = sdxl.is_sdxl_folder(path, revision)
    if xl:
        loaders.update(sdxl.load_parts(path, dtype, kw))
    parts = {}
    for name, load in loaders.items():
        try:
            parts[name] = load()
        except Exception as e:
            raise ModelLoadError(f"cannot load {name} of model {path!r}: {type(e).__name__}: {e}") from e
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if name in parts:
            parts[name].requires_grad_(False).eval()
    if xl:
        try:
            parts = sdxl.assemble(parts, path, revision)
        except ValueError as e:
            raise ModelLoadError(f"cannot load model {path!r} as SDXL: {e}") from e
    return Components(source=path, **parts)


def save_pipeline(components: Components, folder: str | os.PathLike, unet=None) -> Path:
    """Write a StableDiffusionPipeline (SDXL: StableDiffusionXLPipeline) folder atomically: written beside, then
    renamed into place. The UNet saved is the plain diffusers one (SDXL's conditioning hook is not saved)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        components.pipeline(unet=unet).save_pretrained(tmp, safe_serialization=True)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return folder
