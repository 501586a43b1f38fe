"""SDXL (`model=sdxl`): two text encoders and the UNet's added conditioning, carried by one tensor per prompt.

Every UNet call in unlearn/ is `unet(x_t, t, encoder_hidden_states=emb)` and every prompt becomes `emb` through
`unlearn.models.text.encode_prompts`. SDXL's UNet also needs the pooled projection of `text_encoder_2` per prompt and
six time ids per image. Passing them beside `emb` would change some thirty call sites, every method, the prepared
data cache and the attacks; instead a prompt's whole conditioning is one tensor, the *packed embedding*:

    emb[:, :T]      (B, T, D1 + D2)  the penultimate hidden states of text_encoder and text_encoder_2, concatenated on
                                     the feature axis (768 + 1280 = 2048 on SDXL 1.0): what cross-attention sees
    emb[:, T, :P]   (B, P)           text_encoder_2's pooled projection (`text_embeds`, P = 1280); emb[:, T, P:] = 0

T is the tokenizers' length (77). It is cached, batched, concatenated for guidance, expanded and sliced like an
SD-1 embedding, so the methods need no SDXL code. The UNet gets a forward pre-hook (`install`, called by
`load_components`) that unpacks it into `encoder_hidden_states` and `added_cond_kwargs = {text_embeds, time_ids}`,
with time_ids = (H, W, 0, 0, H, W) at the model's own resolution (the UNet's sample_size × the VAE's scale: 1024 on
SDXL 1.0), what StableDiffusionXLPipeline passes by default (`_get_add_time_ids`: original size, crop top-left,
target size) and what the ESD authors' `esd_sdxl.py` trains with. A hook rather than a wrapper module because the
UNet then stays a plain `UNet2DConditionModel`: the parameter names that trainable subsets, LoRA targets,
checkpoints and deltas use are unchanged, a frozen copy (deepcopy) keeps the hook, and `save_pretrained` writes the
plain UNet. A call that passes `added_cond_kwargs` itself (diffusers' own pipeline) goes through untouched.

The closed forms (UCE, RECE) edit the cross-attention projections, whose inputs are the token rows alone:
`token_states(emb)` drops the pooled row (the UCE authors' script edits every attn2 to_k / to_v on the 2048-d
`encode_prompt` states, at tokenizer 1's positions, and leaves the pooled path alone).

The unconditional branch is the encoded "" in every method and in sampling, as in `esd_sdxl.py`; diffusers' own
pipeline instead uses zeros when no negative prompt is given (`force_zeros_for_empty_prompt`), which the exported
folder keeps as the source had it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

PIPELINE_CLASS = "StableDiffusionXLPipeline"
SUBFOLDERS = ("text_encoder_2", "tokenizer_2")  # beside SD's unet, vae, text_encoder, tokenizer, scheduler
HIDDEN_LAYER = -2  # SDXL conditions on the penultimate hidden states of both encoders


class TextEncoders(nn.Module):
    """SDXL's two text encoders as one module (moved, frozen, hashed and compared together); `encode` packs."""

    def __init__(self, text_encoder, text_encoder_2, force_zeros_for_empty_prompt: bool = True):
        super().__init__()
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt  # written back into the exported folder

    @property
    def config(self) -> dict:
        """Both architectures (what a fingerprint hashes of a model part's config)."""
        from unlearn.models.fingerprint import model_config

        return {"text_encoder": model_config(self.text_encoder), "text_encoder_2": model_config(self.text_encoder_2)}

    def forward(self, *args, **kwargs):
        raise TypeError("SDXL's two text encoders are read through unlearn.models.text.encode_prompts (a packed "
                        "embedding, unlearn/models/sdxl.py), not called as one encoder")


class Tokenizers:
    """SDXL's two tokenizers. Tokenizing as one (ids, attention masks, positions, decoding) reads as the first,
    whose positions diffusers' pipeline and the UCE authors' script use; the second differs from it only in its pad
    token, and both are used by `encode`."""

    def __init__(self, tokenizer, tokenizer_2):
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2

    def __call__(self, *args, **kwargs):
        return self.tokenizer(*args, **kwargs)

    def __len__(self):
        return len(self.tokenizer)

    def __getattr__(self, name):
        if name.startswith("__") or name in ("tokenizer", "tokenizer_2"):
            raise AttributeError(name)
        return getattr(self.tokenizer, name)

    def parts(self) -> list:
        return [self.tokenizer, self.tokenizer_2]


@torch.no_grad()
def encode(tokenizers: Tokenizers, encoders: TextEncoders, prompts: list[str], batch_size: int = 64) -> torch.Tensor:
    """(len(prompts), T + 1, D1 + D2) packed embeddings (layout in the module docstring)."""
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk, outputs = prompts[i:i + batch_size], []
        for tok, enc in ((tokenizers.tokenizer, encoders.text_encoder), (tokenizers.tokenizer_2, encoders.text_encoder_2)):
            ids = tok(chunk, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(next(enc.parameters()).device)
            outputs.append(enc(ids, output_hidden_states=True))
        out.append(conditioning(*outputs))
    return torch.cat(out)


def conditioning(out, out_2) -> torch.Tensor:
    """The packed embedding of both encoders' outputs (called with output_hidden_states=True); differentiable, for
    a method that trains the encoders (AdvUnlearn)."""
    pooled = getattr(out_2, "text_embeds", None)
    if pooled is None:
        raise TypeError("text_encoder_2 must give a pooled projection (CLIPTextModelWithProjection's text_embeds)")
    states = (out.hidden_states[HIDDEN_LAYER], out_2.hidden_states[HIDDEN_LAYER])
    return pack(torch.cat([s.to(pooled.dtype) for s in states], dim=-1), pooled)


def pack(tokens: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """(B, T, D) token states and (B, P) pooled vectors, P <= D, as one (B, T + 1, D) tensor."""
    if pooled.shape[-1] > tokens.shape[-1]:
        raise ValueError(f"a pooled vector of {pooled.shape[-1]} features does not fit a row of {tokens.shape[-1]}")
    row = tokens.new_zeros(tokens.shape[0], 1, tokens.shape[-1])
    row[:, 0, :pooled.shape[-1]] = pooled.to(tokens.dtype)
    return torch.cat([tokens, row], dim=1)


def token_states(emb: torch.Tensor) -> torch.Tensor:
    """The cross-attention inputs of packed embeddings: every row but the pooled one."""
    return emb[..., :-1, :]


def pooled_of(emb: torch.Tensor, dim: int) -> torch.Tensor:
    return emb[..., -1, :dim]


def default_time_ids(unet, vae) -> tuple[int, ...]:
    """(H, W, 0, 0, H, W) at the model's own size: original size, crop top-left, target size."""
    side = unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
    return (side, side, 0, 0, side, side)


class AddedConditioning:
    """The UNet's forward pre-hook that unpacks a packed embedding (a plain object, so a deepcopy of the UNet
    carries its own copy)."""

    def __init__(self, time_ids: tuple[int, ...], pooled_dim: int):
        self.time_ids, self.pooled_dim = tuple(int(v) for v in time_ids), int(pooled_dim)

    def __call__(self, module, args, kwargs):
        if kwargs.get("added_cond_kwargs") is not None:
            return None  # conditioned by its caller (diffusers' pipeline)
        args = list(args)
        positional = len(args) > 2
        emb = args[2] if positional else kwargs.get("encoder_hidden_states")
        if emb is None:
            return None
        if emb.shape[-1] < self.pooled_dim:
            raise ValueError(f"an SDXL UNet needs packed embeddings (unlearn/models/sdxl.py) of width >= "
                             f"{self.pooled_dim}; got shape {tuple(emb.shape)}")
        time_ids = torch.tensor(self.time_ids, device=emb.device, dtype=emb.dtype).expand(emb.shape[0], -1)
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled_of(emb, self.pooled_dim), "time_ids": time_ids}
        if positional:
            args[2] = token_states(emb)
        else:
            kwargs["encoder_hidden_states"] = token_states(emb)
        return tuple(args), kwargs


def install(unet, time_ids: tuple[int, ...], pooled_dim: int):
    """Hook `unet` (in place, once) to take packed embeddings; checks the added embedding's width first."""
    if any(isinstance(h, AddedConditioning) for h in unet._forward_pre_hooks.values()):
        return unet
    expected = unet.add_embedding.linear_1.in_features if getattr(unet, "add_embedding", None) is not None else None
    given = unet.config.addition_time_embed_dim * len(time_ids) + pooled_dim \
        if unet.config.addition_time_embed_dim else None
    if unet.config.addition_embed_type != "text_time" or expected != given:
        raise ValueError(f"not an SDXL UNet: addition_embed_type={unet.config.addition_embed_type!r} (needs "
                         f"'text_time'), added embedding of {expected} features for {given} (time ids and a "
                         f"pooled vector of {pooled_dim})")
    unet.register_forward_pre_hook(AddedConditioning(time_ids, pooled_dim), with_kwargs=True)
    return unet


def model_index(path: str, revision: str | None = None, cached_only: bool = False) -> dict | None:
    """A folder's or Hub id's model_index.json; None when it cannot be read (now)."""
    from unlearn.models.loading import _looks_local

    if _looks_local(path):
        file = Path(path).expanduser() / "model_index.json"
    else:
        import huggingface_hub as hub

        try:
            found = hub.try_to_load_from_cache(path, "model_index.json", revision=revision) if cached_only else \
                hub.hf_hub_download(path, "model_index.json", revision=revision)
        except Exception:  # noqa: BLE001 - offline, unknown id: the loader names it
            return None
        file = Path(found) if isinstance(found, str) else None
    try:
        return json.loads(file.read_text()) if file else None
    except (OSError, ValueError, AttributeError):
        return None


def pipeline_class(path: str, revision: str | None = None, cached_only: bool = False) -> str | None:
    return (model_index(path, revision, cached_only) or {}).get("_class_name")


def is_sdxl_folder(path: str, revision: str | None = None, cached_only: bool = False) -> bool:
    """A StableDiffusionXLPipeline folder: so its index says, or (no index) it holds text_encoder_2/."""
    name = pipeline_class(path, revision, cached_only)
    if name is not None:
        return name == PIPELINE_CLASS
    from unlearn.models.loading import _looks_local

    return _looks_local(path) and (Path(path).expanduser() / "text_encoder_2").is_dir()


def load_parts(path: str, dtype, kw: dict) -> dict:
    """Loaders of the parts SDXL adds (the caller names failures by part)."""
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    return {"text_encoder_2": lambda: CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2",
                                                                                  dtype=dtype, **kw),
            "tokenizer_2": lambda: CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", **kw)}


def pipeline_options(path: str, revision: str | None = None) -> dict:
    """What the source's model_index.json says of the empty prompt (kept in the exported folder)."""
    index = model_index(path, revision, cached_only=True) or {}
    return {"force_zeros_for_empty_prompt": bool(index.get("force_zeros_for_empty_prompt", True))}


def assemble(parts: dict, path: str, revision: str | None = None) -> dict:
    """Loaded parts -> Components fields: the two encoders and tokenizers paired, the UNet hooked."""
    te = TextEncoders(parts.pop("text_encoder"), parts.pop("text_encoder_2"), **pipeline_options(path, revision))
    tok = Tokenizers(parts.pop("tokenizer"), parts.pop("tokenizer_2"))
    install(parts["unet"], default_time_ids(parts["unet"], parts["vae"]), te.text_encoder_2.config.projection_dim)
    return {**parts, "text_encoder": te, "tokenizer": tok}


def pipeline(components, unet=None):
    """A StableDiffusionXLPipeline over SDXL components (optionally another UNet)."""
    from diffusers import StableDiffusionXLPipeline

    te, tok = components.text_encoder, components.tokenizer
    pipe = StableDiffusionXLPipeline(
        vae=components.vae, text_encoder=te.text_encoder, text_encoder_2=te.text_encoder_2, tokenizer=tok.tokenizer,
        tokenizer_2=tok.tokenizer_2, unet=unet or components.unet, scheduler=components.scheduler,
        force_zeros_for_empty_prompt=te.force_zeros_for_empty_prompt, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
