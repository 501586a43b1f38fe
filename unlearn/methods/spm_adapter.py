"""SPM's one-dimensional adapter, its facilitated transport, and its file (Lyu et al., CVPR 2024).

The adapter adds up(down(x)) to every Linear and Conv2d inside the UNet's transformer blocks (Transformer2DModel:
attention projections, feed-forward, proj_in/proj_out), through forward hooks, so the UNet's own modules and
state-dict names stay as they are. A layer's output is W x + m^2 (alpha / rank) up(down(x)): the released
infer_spm.py multiplies both factors of the adapter by the transport strength m, so the weight change goes as m^2;
training runs at m = 1 (adapter on) and m = 0 (adapter off, the original model).

Facilitated transport (infer_spm.py `calculate_matching_score`): per prompt, m = max(cosine of the prompt's and the
concept's text-encoder outputs, each flattened over all max_length token positions, padding included; the fraction
of the concept's distinct non-special tokens found in the prompt), the max taken over the concept's prompts. Here it
runs inside the UNet, per sample, from the encoder_hidden_states it receives: the cosine from the states
themselves, the tokens from a memo the text encoder fills whenever it encodes ids (states it never produced, e.g. an
attack's continuous embeddings, get the cosine alone). The released pipeline gives the unconditional half of
classifier-free guidance the prompt's m (one weight set per prompt); so here an unconditional row of a batch laid
out [uncond, cond] takes its partner's m.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unlearn.export import ADAPTER_FILE, FORMAT, FORMAT_VERSION, DeltaError, read_header
from unlearn.models.fingerprint import tensor_sha

COMPONENT = "spm"
BLOCK = "Transformer2DModel"  # SPMNetwork.UNET_TARGET_REPLACE_MODULE_TRANSFORMER (src/models/spm.py)
MEMO_SIZE = 20_000  # encoded prompts whose tokens the transport remembers


def adapter_targets(unet: nn.Module) -> list[str]:
    """Names of the Linear and Conv2d modules inside the UNet's transformer blocks, nothing in ResNet blocks."""
    names = []
    for block_name, block in unet.named_modules():
        if type(block).__name__ != BLOCK:
            continue
        names += [f"{block_name}.{n}" for n, m in block.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return list(dict.fromkeys(names))


class SPMLayer(nn.Module):
    """down: in -> rank (Kaiming-uniform, as nn.Linear's default); up: rank -> out, zero at the start."""

    def __init__(self, module: nn.Module, rank: int):
        super().__init__()
        if isinstance(module, nn.Linear):
            self.down = nn.Linear(module.in_features, rank, bias=False)
            self.up = nn.Linear(rank, module.out_features, bias=False)
        else:  # Conv2d: the down factor takes the module's kernel, the up factor is 1x1
            rank = min(rank, module.in_channels, module.out_channels)
            self.down = nn.Conv2d(module.in_channels, rank, module.kernel_size, module.stride, module.padding,
                                  bias=False)
            self.up = nn.Conv2d(rank, module.out_channels, 1, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)
        self.to(device=module.weight.device, dtype=module.weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x))


class SPMAdapter(nn.Module):
    """The adapter over one UNet. `multiplier` is m: a number, or one value per sample (shape (B,))."""

    def __init__(self, unet: nn.Module, rank: int = 1, alpha: float = 1.0):
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank={rank!r}: an integer >= 1")
        self.rank, self.alpha = int(rank), float(alpha)
        self.scale = self.alpha / self.rank  # SPMLayer.scale (alpha / dim)
        modules = dict(unet.named_modules())
        self.names = adapter_targets(unet)
        if not self.names:
            raise ValueError("this UNet has no transformer block for the SPM adapter")
        self.layers = nn.ModuleList(SPMLayer(modules[n], self.rank) for n in self.names)
        self.multiplier: float | Tensor = 0.0
        self._handles: list = []

    def attach(self, unet: nn.Module) -> SPMAdapter:
        self.detach()
        modules = dict(unet.named_modules())
        for name, layer in zip(self.names, self.layers):
            self._handles.append(modules[name].register_forward_hook(self._hook(layer)))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, layer: SPMLayer):
        def add(_module, args, out):
            m = self.multiplier
            if not torch.is_tensor(m):
                return out if m == 0 else out + (m * m * self.scale) * layer(args[0])
            if m.shape[0] != out.shape[0]:
                raise ValueError(f"SPM multiplier for {m.shape[0]} samples, layer input of {out.shape[0]}")
            m = m.to(out.dtype).view(-1, *[1] * (out.dim() - 1))
            return out + (m * m * self.scale) * layer(args[0])
        return add

    def state(self) -> dict[str, Tensor]:
        """The file's tensors, under the UNet module each layer adapts: `<module>.down.weight`, `<module>.up.weight`."""
        return {f"{n}.{part}.weight": getattr(layer, part).weight.detach().cpu().contiguous()
                for n, layer in zip(self.names, self.layers) for part in ("down", "up")}

    def load(self, tensors: dict[str, Tensor], path: str | Path = "adapter") -> None:
        expected = self.state()
        if set(tensors) != set(expected):
            missing = sorted(set(expected) - set(tensors)) or sorted(set(tensors) - set(expected))
            raise DeltaError(f"SPM adapter {path}: its tensors are not this UNet's transformer layers (e.g. "
                             f"{missing[0]!r}; another architecture or rank?)")
        with torch.no_grad():
            for n, layer in zip(self.names, self.layers):
                for part in ("down", "up"):
                    w = getattr(layer, part).weight
                    value = tensors[f"{n}.{part}.weight"]
                    if value.shape != w.shape:
                        raise DeltaError(f"SPM adapter {path}: {n}.{part}.weight is {tuple(value.shape)}, this "
                                         f"UNet's {tuple(w.shape)}")
                    w.copy_(value.to(w.dtype))


# ---------------------------------------------------------------------------------------------- transport
def token_fraction(prompt_tokens: set[int] | None, concept_tokens: set[int]) -> float:
    """|prompt ∩ concept| / |concept| over distinct non-special token ids (tokenuni); no ids known: 0."""
    if not prompt_tokens or not concept_tokens:
        return 0.0
    return len(prompt_tokens & concept_tokens) / len(concept_tokens)


def transport_strength(emb: Tensor, concept_emb: Tensor, prompt_tokens: list[set[int] | None],
                       concept_tokens: list[set[int]]) -> Tensor:
    """m per sample: max over the concept's K prompts of max(flattened cosine, token fraction).

    emb (B, T, D), concept_emb (K, T, D); prompt_tokens one set per sample (None where unknown)."""
    cos = F.cosine_similarity(emb.flatten(1)[:, None].float(), concept_emb.flatten(1)[None].float(), dim=-1)
    frac = torch.tensor([[token_fraction(p, c) for c in concept_tokens] for p in prompt_tokens],
                        dtype=cos.dtype, device=cos.device)
    return torch.maximum(cos, frac).amax(dim=1)


def pair_unconditional(m: Tensor, emb: Tensor, uncond: Tensor) -> Tensor:
    """A batch laid out [uncond, cond] (even size, every row of the first half the unconditional embedding): each
    unconditional row takes its conditional partner's m, as one weight set per prompt gives in infer_spm.py."""
    n = emb.shape[0]
    if n % 2 or not all(torch.equal(row, uncond.to(row)) for row in emb[: n // 2]):
        return m
    half = m[n // 2:]
    return torch.cat([half, half])


def _row_key(row: Tensor) -> bytes:
    return tensor_sha(row.detach().float())


def token_memo(text_encoder: nn.Module, special_ids: set[int], layer: int | None = None) -> OrderedDict:
    """The text encoder's memo {hidden-state row -> its distinct non-special ids}, filled by a forward hook that
    is installed once per encoder; the row is keyed as encoded and as each lower-precision UNet would see it.
    `layer`: key on that entry of `hidden_states` (calls without output_hidden_states record nothing) rather than
    on the last hidden states."""
    attr = "_spm_token_memo" if layer is None else f"_spm_token_memo_{layer}"
    memo = getattr(text_encoder, attr, None)
    if memo is not None:
        return memo
    memo = OrderedDict()

    def record(_module, args, kwargs, out):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:  # inputs_embeds: no tokens to remember
            return
        if layer is not None:
            hidden = getattr(out, "hidden_states", None)
            if hidden is None:
                return
            states = hidden[layer]
        else:
            states = out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state
        for row_ids, row in zip(ids.tolist(), states):
            tokens = frozenset(row_ids) - special_ids
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                memo[_row_key(row.to(dtype))] = tokens
        while len(memo) > MEMO_SIZE * 3:
            memo.popitem(last=False)

    text_encoder.register_forward_hook(record, with_kwargs=True)
    setattr(text_encoder, attr, memo)
    return memo


def memo_of(text_encoder: nn.Module, special_ids: set[int]):
    """The memo for what the UNet is given, and the part of one of its rows that keys it. SD: the encoder's last
    hidden states, the whole row. SDXL: a packed embedding's token row starts with the first encoder's penultimate
    states (unlearn/models/sdxl.py), so the first D1 features, recorded from that encoder; its ids are tokenizer
    1's, the ones the token fraction counts."""
    from unlearn.models import sdxl

    if not isinstance(text_encoder, sdxl.TextEncoders):
        return token_memo(text_encoder, special_ids), lambda row: row
    first = text_encoder.text_encoder
    width = first.config.hidden_size
    return token_memo(first, special_ids, layer=sdxl.HIDDEN_LAYER), lambda row: row[..., :width]


def special_ids_of(tokenizer) -> set[int]:
    return set(tokenizer.all_special_ids)


def install_transport(unet: nn.Module, adapter: SPMAdapter, prompts: list[str], tokenizer, text_encoder) -> nn.Module:
    """Make `unet` (with `adapter` attached) prompt-dependent: before each forward, m per sample from its
    encoder_hidden_states; after it, the adapter off again. The adapter becomes the UNet's submodule
    `spm_adapter`, so it moves with the UNet; returns the UNet."""
    from unlearn.models.text import encode_prompts, token_rows

    special = special_ids_of(tokenizer)
    memo, key_of = memo_of(text_encoder, special)
    ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids
    concept_tokens = [frozenset(row) - special for row in ids]
    dtype = next(unet.parameters()).dtype

    def encoded(texts):  # what cross-attention reads (SDXL: the token rows, as the hook below sees them)
        return token_rows(text_encoder, encode_prompts(tokenizer, text_encoder, texts)).to(dtype)

    unet.register_buffer("spm_concept_emb", encoded(list(prompts)), persistent=False)
    unet.register_buffer("spm_uncond_emb", encoded([""])[0], persistent=False)
    unet.spm_adapter = adapter.attach(unet)

    def before(module, args, kwargs):
        # On SDXL this runs after the packed embedding's unpacking hook (installed when the UNet was loaded), so
        # `emb` is the token rows of both encoders, what diffusers' own pipeline passes too.
        emb = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        tokens = [memo.get(_row_key(key_of(row))) for row in emb]
        m = transport_strength(emb, module.spm_concept_emb.to(emb.device), tokens, concept_tokens)
        adapter.multiplier = pair_unconditional(m, emb, module.spm_uncond_emb).to(emb.device)

    def after(_module, _args, _out):
        adapter.multiplier = 0.0

    unet.register_forward_pre_hook(before, with_kwargs=True)
    unet.register_forward_hook(after)
    return unet


# ---------------------------------------------------------------------------------------------- the file
def save_adapter(path: str | Path, adapter: SPMAdapter, prompts: list[str], base: dict, method: str = "spm",
                 concept: str = "") -> Path:
    """spm.safetensors: the adapter's tensors; metadata as a delta's (unlearn/export/delta.py: format, base, its
    fingerprint) with component `spm`, rank, alpha and the concept prompts the transport compares against."""
    from unlearn import __version__
    from unlearn.utils.files import save_tensors_atomic

    path = Path(path)
    if path.is_dir():
        path = path / ADAPTER_FILE
    tensors = adapter.state()
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "component": COMPONENT,
            "base": str(base["path"]), "base_revision": base.get("revision") or "", "base_dtype": str(base["dtype"]),
            "base_fingerprint": json.dumps(base["fingerprint"], sort_keys=True), "method": method,
            "method_class": "unlearn.methods.spm.SPM", "trainable": "spm_adapter", "concept": concept,
            "rank": str(adapter.rank), "alpha": str(adapter.alpha), "prompts": json.dumps(list(prompts)),
            "tensors": str(len(tensors)), "unlearn_version": __version__}
    save_tensors_atomic(tensors, path, metadata=meta)
    return path


def read_adapter(path: str | Path) -> tuple[dict[str, str], dict[str, Tensor]]:
    from safetensors.torch import load_file

    meta = read_header(path)
    if meta.get("component") != COMPONENT:
        raise DeltaError(f"{path}: component {meta.get('component')!r}, not an SPM adapter")
    return meta, load_file(str(path))


def transport_unet(unet: nn.Module, meta: dict[str, str], tensors: dict[str, Tensor], tokenizer, text_encoder,
                   path: str | Path = "adapter") -> nn.Module:
    """`unet` (changed in place: pass a copy) with the file's adapter and facilitated transport."""
    adapter = SPMAdapter(unet, rank=int(meta["rank"]), alpha=float(meta["alpha"]))
    adapter.load(tensors, path)
    return install_transport(unet, adapter.requires_grad_(False), json.loads(meta["prompts"]), tokenizer,
                             text_encoder)
