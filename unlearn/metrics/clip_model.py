"""One CLIP model shared by every CLIP-based metric, with batched preprocessing done in torch.

transformers' image processors work image by image through PIL (v5 falls back to a PIL backend when torchvision is
absent), which would pull generated images off the GPU one at a time. We read only the processor's *settings*
(resize, centre crop, mean, std, resampling) from the model folder and apply them to a whole float batch on its own
device. Resizing uses torch's antialiased interpolation, so values differ from PIL's by a few 1e-3 at most.

Embeddings come from the pooled output of each tower followed by its projection, the same path as
`CLIPModel.get_image_features` / `get_text_features` (whose return type changed between transformers 4 and 5).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# PIL resampling codes as saved in preprocessor_config.json -> torch interpolation modes.
_RESAMPLE_MODES = {0: "nearest", 2: "bilinear", 3: "bicubic"}


@dataclass(frozen=True)
class PreprocessSettings:
    """Image preprocessing read from a CLIP folder.

    `resize` is an int (shortest edge, aspect ratio kept, as CLIP does) or a (height, width) pair; None skips it.
    `crop` is a (height, width) centre crop, or None.
    """

    resize: int | tuple[int, int] | None
    crop: tuple[int, int] | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    mode: str = "bicubic"


def _field(size, key: str):
    if size is None or isinstance(size, int):
        return size
    if isinstance(size, Mapping):
        return size.get(key)
    return getattr(size, key, None)  # transformers 5's SizeDict


def _settings_from_processor(proc) -> PreprocessSettings:
    resize = None
    if getattr(proc, "do_resize", True) and getattr(proc, "size", None) is not None:
        size = proc.size
        if isinstance(size, int):  # legacy configs (openai/clip-vit-*) store a bare int
            resize = size
        elif _field(size, "shortest_edge"):
            resize = int(_field(size, "shortest_edge"))
        elif _field(size, "height") and _field(size, "width"):
            resize = (int(_field(size, "height")), int(_field(size, "width")))
        else:
            raise ValueError(f"unsupported resize setting {size!r}")
    crop = None
    if getattr(proc, "do_center_crop", True) and getattr(proc, "crop_size", None) is not None:
        cs = proc.crop_size
        crop = (cs, cs) if isinstance(cs, int) else (int(_field(cs, "height")), int(_field(cs, "width")))
    if getattr(proc, "do_normalize", True):
        mean, std = tuple(float(v) for v in proc.image_mean), tuple(float(v) for v in proc.image_std)
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    code = int(getattr(proc, "resample", 3))
    if code not in _RESAMPLE_MODES:
        raise ValueError(f"resampling filter {code} has no torch equivalent (supported: {sorted(_RESAMPLE_MODES)})")
    return PreprocessSettings(resize, crop, mean, std, _RESAMPLE_MODES[code])


def load_preprocess_settings(path: str | Path) -> PreprocessSettings:
    """Read the image settings of a local CLIP folder or a (cached) hub id."""
    from transformers import AutoImageProcessor

    try:
        proc = AutoImageProcessor.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        raise OSError(f"cannot read CLIP image preprocessing settings from {path!s}: {err}") from err
    return _settings_from_processor(proc)


def _resize_shortest(images: Tensor, shortest: int) -> tuple[int, int]:
    h, w = images.shape[-2:]
    # Same rounding as transformers' get_resize_output_image_size (long side truncated).
    return (shortest, int(shortest * w / h)) if h <= w else (int(shortest * h / w), shortest)


class ClipEncoder(nn.Module):
    """Frozen CLIP: L2-normalised image and text embeddings for batches of float images in [0, 1]."""

    def __init__(self, model, tokenizer, settings: PreprocessSettings, source: str = ""):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.settings = settings
        self.source = source or str(getattr(model.config, "_name_or_path", ""))
        # The tokenizer of a bare folder may report a huge model_max_length; the position table is the real limit.
        self.max_length = min(int(tokenizer.model_max_length), model.config.text_config.max_position_embeddings)
        self.register_buffer("mean", torch.tensor(settings.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(settings.std).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None) -> ClipEncoder:
        """Load model, tokenizer and image settings from one folder (or a hub id already in the local cache)."""
        from transformers import AutoTokenizer, CLIPModel

        try:
            model = CLIPModel.from_pretrained(str(path))
            tokenizer = AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError) as err:
            raise OSError(f"cannot load a CLIP model and tokenizer from {path!s}: {err}") from err
        if dtype is not None:
            model = model.to(dtype)
        return cls(model, tokenizer, load_preprocess_settings(path), source=str(path))

    def train(self, mode: bool = True) -> ClipEncoder:
        # Metrics get .train() from a parent LightningModule; the encoder is a fixed measuring instrument.
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.logit_scale.dtype

    @property
    def embed_dim(self) -> int:
        return int(self.model.config.projection_dim)

    def preprocess(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) float in [0, 1] (or uint8 in [0, 255]) -> normalised pixel values for the vision tower."""
        if images.dim() == 3:
            images = images.unsqueeze(0)
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        x = images.to(self.device)
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        x = x.expand(-1, 3, -1, -1)
        s = self.settings
        if s.resize is not None:
            hw = _resize_shortest(x, s.resize) if isinstance(s.resize, int) else tuple(s.resize)
            if tuple(x.shape[-2:]) != hw:
                aa = s.mode != "nearest"
                x = F.interpolate(x, size=hw, mode=s.mode, antialias=aa, align_corners=False if aa else None)
                x = x.clamp(0.0, 1.0)  # bicubic overshoots; PIL clamps to the pixel range
        if s.crop is not None:
            ch, cw = s.crop
            ph, pw = max(ch - x.shape[-2], 0), max(cw - x.shape[-1], 0)
            if ph or pw:
                x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
            top, left = (x.shape[-2] - ch) // 2, (x.shape[-1] - cw) // 2
            x = x[..., top:top + ch, left:left + cw]
        x = (x - self.mean) / self.std
        return x.to(self.dtype)

    def image_features(self, images: Tensor, normalize: bool = True) -> Tensor:
        """(B, embed_dim) float32 image embeddings; unit length unless normalize=False."""
        out = self.model.vision_model(pixel_values=self.preprocess(images))
        feats = self.model.visual_projection(out.pooler_output).float()
        return F.normalize(feats, dim=-1) if normalize else feats

    def text_features(self, texts: str | Sequence[str], normalize: bool = True) -> Tensor:
        """(N, embed_dim) float32 text embeddings; repeated strings are encoded once."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        unique = list(dict.fromkeys(texts))
        tok = self.tokenizer(unique, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        out = self.model.text_model(input_ids=tok.input_ids.to(self.device),
                                    attention_mask=tok.attention_mask.to(self.device))
        feats = self.model.text_projection(out.pooler_output).float()
        feats = F.normalize(feats, dim=-1) if normalize else feats
        where = {t: i for i, t in enumerate(unique)}
        return feats[torch.tensor([where[t] for t in texts], device=feats.device)]

    def forward(self, images: Tensor) -> Tensor:
        return self.image_features(images)
