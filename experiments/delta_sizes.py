"""How large `export=delta` is for every method, against the whole pipeline folder: a markdown table on stdout.

python experiments/delta_sizes.py

Toy: each method is built on the shipped toy model (conf/method/<m>.yaml, model=toy) and its `trainable_names`
counted; the pipeline folder is the toy's on disk. SD-1.4: the same subset rule (unlearn.methods.base.TRAINABLE)
applied to SD-1.4's UNet built from its architecture on the meta device (shapes, no weights, no download), and the
pipeline folder's size counted the same way over UNet, VAE and text encoder (fp32; tokenizer and scheduler files
are kilobytes). A delta's size is its tensors' bytes (the safetensors header adds a few kB). MB = 10^6 bytes.
LoRA: the file `method.adapter=lora` writes beside its delta (pytorch_lora_weights.safetensors), at the rank of
conf/adapter/default.yaml, counted by putting that LoRA on the same subset of each UNet (on the meta device for
SD-1.4); "-" where a method takes no LoRA (closed-form edits, methods that refuse it).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

ROOT = Path(__file__).resolve().parents[1]
MB = 1e6

# CompVis/stable-diffusion-v1-4's architecture (unet/config.json, vae/config.json, text_encoder/config.json).
SD14_UNET = {"sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
             "block_out_channels": (320, 640, 1280, 1280), "cross_attention_dim": 768, "attention_head_dim": 8,
             "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
             "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, "norm_num_groups": 32}
SD14_VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "sample_size": 512,
            "block_out_channels": (128, 256, 512, 512), "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4}
SD14_TEXT = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
             "num_attention_heads": 12, "max_position_embeddings": 77, "projection_dim": 768,
             "hidden_act": "quick_gelu"}


def nbytes(module: torch.nn.Module, keep=lambda name: True) -> tuple[int, int]:
    """(tensors, bytes) of the state-dict entries `keep` selects."""
    chosen = [t for n, t in module.state_dict().items() if keep(n)]
    return len(chosen), sum(t.numel() * t.element_size() for t in chosen)


def sd14_models():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        return UNet2DConditionModel(**SD14_UNET), AutoencoderKL(**SD14_VAE), CLIPTextModel(CLIPTextConfig(**SD14_TEXT))


def lora_bytes(unet: torch.nn.Module, names: list[str], rank: int) -> int:
    """Bytes of the LoRA tensors of rank `rank` that method.adapter=lora puts on the subset `names` of `unet`."""
    from unlearn.methods.adapters import add_lora, lora_targets

    targets = lora_targets(unet, names)
    if not targets:
        return 0
    unet = copy.deepcopy(unet)
    names = set(add_lora(unet, targets, rank, rank, 0.0))
    return sum(p.numel() * p.element_size() for n, p in unet.named_parameters() if n in names)


def toy_subsets() -> dict[str, tuple[str, list[str], int | None]]:
    """{method config: (subset name, trainable tensor names, LoRA rank or None if it takes no LoRA)} on the toy
    model."""
    from unlearn.export.delta import subset_name
    from unlearn.models.loading import load_components
    from unlearn.validate import group_problems, resolve_groups

    out = {}
    for method in sorted(p.stem for p in (ROOT / "conf" / "method").glob("*.yaml")):
        with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("train", overrides=[f"method={method}", "model=toy", f"paths.root={ROOT}"])
            with_lora = compose("train", overrides=[f"method={method}", "model=toy", f"paths.root={ROOT}",
                                                    "method.adapter=lora"])
        comps = load_components(cfg.model.path, dtype=cfg.model.dtype)
        module = instantiate(cfg.method, components=comps, _convert_="object")
        takes_lora = not group_problems(resolve_groups(with_lora)[0], "method")  # closed forms, SPM refuse it
        rank = int(with_lora.method.lora.rank) if takes_lora else None
        out[method] = (subset_name(module.export_unet(), module.trainable_names), list(module.trainable_names), rank)
    return out


def mb(n: int | None) -> str:
    return f"{n / MB:,.3f}" if n else "-"


def main() -> None:
    from unlearn.methods.base import TRAINABLE
    from unlearn.models.loading import TOY_PIPELINE, load_components

    toy_unet = load_components(str(TOY_PIPELINE)).unet
    toy_folder = sum(p.stat().st_size for p in TOY_PIPELINE.rglob("*") if p.is_file())
    unet, vae, text = sd14_models()
    sd_folder = sum(nbytes(m)[1] for m in (unet, vae, text))
    rows = [("| method | trainable subset | tensors toy / SD-1.4 | MB toy | MB SD-1.4 | toy: % of pipeline folder "
            f"({toy_folder / MB:.1f} MB) | SD-1.4: % of pipeline folder ({sd_folder / MB:,.0f} MB) | "
            "LoRA MB toy | LoRA MB SD-1.4 |"),
            "|---|---|---|---|---|---|---|---|---|"]
    for method, (subset, names, rank) in toy_subsets().items():
        chosen = set(names)
        n_toy, b_toy = nbytes(toy_unet, chosen.__contains__)
        keep = TRAINABLE.get(subset)
        n_sd, b_sd = nbytes(unet, keep) if keep else (0, float("nan"))
        sd_names = [n for n, _ in unet.named_parameters() if keep(n)] if keep else []
        lora_toy = lora_bytes(toy_unet, names, rank) if rank else None
        lora_sd = lora_bytes(unet, sd_names, rank) if rank else None
        rows.append(f"| {method} | {subset} | {n_toy} / {n_sd} | {b_toy / MB:.2f} | {b_sd / MB:,.1f} | "
                    f"{100 * b_toy / toy_folder:.1f} | {100 * b_sd / sd_folder:.1f} | {mb(lora_toy)} | {mb(lora_sd)} |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
