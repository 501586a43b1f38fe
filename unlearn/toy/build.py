"""Build the toy world's models from a seed: tokenizer -> tiny CLIP -> tiny VAE -> tiny UNet -> pipeline folder.

    python -m unlearn.toy.build                 # the shipped weights (~50 min on 2 idle CPU cores)
    python -m unlearn.toy.build --quick --out /tmp/toy   # a smoke-sized rebuild (tests)
    python -m unlearn.toy.build --world v2 --out /tmp/toy2   # the staged world v2 (unlearn/toy/world2.py)

Same seed, same torch build and thread count -> the same bytes. The UNet is conditioned on the *trained* CLIP
text tower, frozen, exactly as Stable Diffusion conditions on CLIP ViT-L/14.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from unlearn.toy import world, world2
from unlearn.toy.tokenizer import write_tokenizer_files

WEIGHTS = Path(__file__).parent / "weights"
MAX_TOKENS = 16
WORLDS = {"v1": world, "v2": world2}  # v2 is staged: built only into a folder given with --out


@dataclass
class Budget:
    clip_steps: int = 1200
    vae_steps: int = 700
    unet_steps: int = 2800
    bank: int = 30_000
    clip_batch: int = 256
    vae_batch: int = 16
    unet_batch: int = 32


# v2's CLIP needs twice v1's steps to read shapes (90 % at 2,400 against 76 % at 1,200: docs/toy_world_v2.md).
BUDGETS = {"v1": Budget(), "v2": Budget(clip_steps=2400)}
QUICK = Budget(clip_steps=20, vae_steps=20, unet_steps=20, bank=256, clip_batch=32, vae_batch=16, unet_batch=8)


def warmup_cosine(opt, total: int, warmup: int = 100):
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Noise, blur and brightness, so CLIP also recognises imperfect *generated* images."""
    n = x.shape[0]
    blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    use_blur = (torch.rand(n, 1, 1, 1, generator=g) < 0.3).float()
    x = use_blur * blur + (1 - use_blur) * x
    x = x * (1 + 0.15 * (torch.rand(n, 1, 1, 1, generator=g) - 0.5)) + 0.1 * (torch.rand(n, 1, 1, 1, generator=g) - 0.5)
    x = x + torch.randn(x.shape, generator=g) * torch.rand(n, 1, 1, 1, generator=g) * 0.3
    return x.clamp(-1.5, 1.5)


# ---------------------------------------------------------------------------------------------- tokenizer / CLIP
def max_tokens(w=world) -> int:
    return getattr(w, "MAX_TOKENS", MAX_TOKENS)


def build_tokenizer(out: Path, w=world):
    from transformers import CLIPTokenizer

    write_tokenizer_files(out / "tokenizer", w.vocabulary())
    tok = CLIPTokenizer.from_pretrained(out / "tokenizer", model_max_length=max_tokens(w))
    tok.save_pretrained(out / "tokenizer")
    return tok


def clip_config(vocab_size: int, eos_id: int, bos_id: int, n_tokens: int = MAX_TOKENS):
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

    text = CLIPTextConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=256, num_hidden_layers=3,
                          num_attention_heads=4, max_position_embeddings=n_tokens, projection_dim=64,
                          eos_token_id=eos_id, bos_token_id=bos_id, pad_token_id=eos_id)
    vision = CLIPVisionConfig(image_size=world.IMAGE_SIZE, patch_size=8, hidden_size=64, intermediate_size=256,
                              num_hidden_layers=4, num_attention_heads=4, projection_dim=64)
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=64)


def caption_matches(scenes: list, captions: list[str], w=world) -> torch.Tensor:
    """M[i, j] = caption j truly describes image i (a caption without colour fits every colour)."""
    if w is not world:
        return torch.tensor(w.caption_matches(scenes, captions), dtype=torch.float)
    fits = [{s.caption(True), s.caption(False)} for s in scenes]
    return torch.tensor([[float(c in f) for c in captions] for f in fits])


def train_clip(out: Path, tok, budget: Budget, seed: int, w=world):
    from transformers import CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(seed)
    rng, g = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    cfg = clip_config(len(tok), tok.eos_token_id, tok.bos_token_id, max_tokens(w))
    model = CLIPModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    sched = warmup_cosine(opt, budget.clip_steps)
    model.train()
    for step in range(budget.clip_steps):
        images, captions, scenes = w.sample_batch(budget.clip_batch, rng)
        pixels = augment(to_tensor(images), g)
        ids = tok(captions, padding="max_length", max_length=max_tokens(w), truncation=True, return_tensors="pt")
        img = F.normalize(_image_features(model, pixels), dim=-1)
        txt = F.normalize(_text_features(model, ids.input_ids), dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * img @ txt.T
        match = caption_matches(scenes, captions, w)
        loss = -(match / match.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean() \
            - (match / match.sum(0, keepdim=True) * logits.log_softmax(0)).sum(0).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == budget.clip_steps - 1:
            log(f"clip step {step} loss {loss.item():.3f}")
    model.eval()
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": world.IMAGE_SIZE},
                                           crop_size={"height": world.IMAGE_SIZE, "width": world.IMAGE_SIZE},
                                           image_mean=[0.5] * 3, image_std=[0.5] * 3),
        tokenizer=tok,
    )
    model.save_pretrained(out / "clip")
    processor.save_pretrained(out / "clip")
    return model


def _image_features(model, pixels):
    return model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)


def _text_features(model, ids):
    return model.text_projection(model.text_model(input_ids=ids).pooler_output)


# ---------------------------------------------------------------------------------------------- VAE
def vae_model():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 32), layers_per_block=1,
                         latent_channels=4, norm_num_groups=16, sample_size=world.IMAGE_SIZE,
                         mid_block_add_attention=False)


def train_vae(out: Path, budget: Budget, seed: int, w=world):
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed + 1)
    vae = vae_model()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    sched = warmup_cosine(opt, budget.vae_steps)
    for step in range(budget.vae_steps):
        x = to_tensor(w.sample_batch(budget.vae_batch, rng)[0])
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + 1e-5 * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == budget.vae_steps - 1:
            log(f"vae step {step} loss {loss.item():.4f}")
    vae.eval()
    with torch.no_grad():
        x = to_tensor(w.sample_batch(512, rng)[0])
        std = vae.encode(x).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    return vae


# ---------------------------------------------------------------------------------------------- UNet
def unet_model():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=world.IMAGE_SIZE // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 64), norm_num_groups=8, cross_attention_dim=64, attention_head_dim=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    )


def scheduler():
    from diffusers import DDIMScheduler

    # Stable Diffusion v1's training schedule, so methods see the same timesteps as on SD-1.4.
    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def all_captions() -> list[str]:
    caps = {s.caption(True) for s in world.all_scenes()} | {s.caption(False) for s in world.all_scenes()}
    return [""] + sorted(caps)


def train_unet(out: Path, tok, text_encoder, vae, budget: Budget, seed: int, w=world):
    torch.manual_seed(seed)
    rng, g = np.random.default_rng(seed + 2), torch.Generator().manual_seed(seed + 2)
    # v1 has few captions: encode them all once. v2's are drawn fresh: keep the bank's token ids, encode per step.
    captions = all_captions() if w is world else [""]
    index = {c: i for i, c in enumerate(captions)}
    n_tokens = max_tokens(w)
    with torch.no_grad():
        ids = tok(captions, padding="max_length", max_length=n_tokens, truncation=True, return_tensors="pt")
        table = text_encoder(ids.input_ids).last_hidden_state  # (n_captions, T, 64), frozen
        bank_mean, bank_std, bank_cap = [], [], []
        for start in range(0, budget.bank, 1000):
            imgs, caps, _ = w.sample_batch(min(1000, budget.bank - start), rng)
            dist = vae.encode(to_tensor(imgs)).latent_dist
            bank_mean.append(dist.mean)
            bank_std.append(dist.std)
            bank_cap.extend(index[c] if w is world else index.setdefault(c, len(index)) for c in caps)
        bank_mean, bank_std = torch.cat(bank_mean), torch.cat(bank_std)
        bank_cap = torch.tensor(bank_cap)
    if w is world:
        def embed(i):
            return table[i]
    else:
        bank_ids = tok(list(index), padding="max_length", max_length=n_tokens, truncation=True,
                       return_tensors="pt").input_ids

        @torch.no_grad()
        def embed(i):
            return text_encoder(bank_ids[i]).last_hidden_state
    log(f"latent bank {tuple(bank_mean.shape)}, {len(index)} captions")
    sf = vae.config.scaling_factor
    unet, noise_sched = unet_model(), scheduler()
    ema = unet_model()
    ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=0.01)
    sched = warmup_cosine(opt, budget.unet_steps)
    alphas = noise_sched.alphas_cumprod
    snr = alphas / (1 - alphas)
    t0 = time.time()
    for step in range(budget.unet_steps):
        idx = torch.randint(0, len(bank_cap), (budget.unet_batch,), generator=g)
        lat = (bank_mean[idx] + bank_std[idx] * torch.randn(bank_mean[idx].shape, generator=g)) * sf
        cap = bank_cap[idx].clone()
        cap[torch.rand(len(cap), generator=g) < 0.1] = 0  # caption dropout -> classifier-free guidance
        noise = torch.randn(lat.shape, generator=g)
        t = torch.randint(0, 1000, (len(idx),), generator=g)
        pred = unet(noise_sched.add_noise(lat, noise, t), t, encoder_hidden_states=embed(cap)).sample
        weight = (snr[t].clamp(max=5.0) / snr[t]).view(-1, 1, 1, 1)  # min-SNR-5 weighting for eps-prediction
        loss = (weight * (pred - noise) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        if step % 100 == 0 or step == budget.unet_steps - 1:
            log(f"unet step {step} loss {loss.item():.4f} ({(time.time() - t0) / (step + 1):.2f} s/step)")
        if step in (200, budget.unet_steps // 2) or step == budget.unet_steps - 1:
            log(f"conditioning check at step {step}: {conditioning_check(unet, noise_sched, embed, bank_mean, bank_cap, sf)}")
    return ema


@torch.no_grad()
def conditioning_check(unet, noise_sched, embed, bank_mean, bank_cap, sf, n: int = 64) -> dict:
    """Denoising loss with the true caption vs a shuffled one: conditioning works iff true < wrong clearly."""
    g = torch.Generator().manual_seed(0)
    idx = torch.arange(n)
    lat = bank_mean[idx] * sf
    noise = torch.randn(lat.shape, generator=g)
    t = torch.full((n,), 600)
    x = noise_sched.add_noise(lat, noise, t)
    true = F.mse_loss(unet(x, t, encoder_hidden_states=embed(bank_cap[idx])).sample, noise).item()
    wrong = F.mse_loss(unet(x, t, encoder_hidden_states=embed(bank_cap[idx.roll(1)])).sample, noise).item()
    empty = F.mse_loss(unet(x, t, encoder_hidden_states=embed(torch.zeros(n, dtype=torch.long))).sample, noise).item()
    return {"true": round(true, 4), "shuffled": round(wrong, 4), "empty": round(empty, 4)}


# ---------------------------------------------------------------------------------------------- assemble
def build(out: Path, budget: Budget, seed: int = 0, stages: tuple[str, ...] = ("clip", "vae", "unet"),
          w=world) -> Path:
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPModel, CLIPTextModel

    torch.use_deterministic_algorithms(True)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out, w)
    clip = train_clip(out, tok, budget, seed, w) if "clip" in stages else CLIPModel.from_pretrained(out / "clip")
    text_encoder = CLIPTextModel(clip.config.text_config)
    getattr(text_encoder, "text_model", text_encoder).load_state_dict(clip.text_model.state_dict())
    text_encoder.eval().requires_grad_(False)
    vae = train_vae(out, budget, seed, w) if "vae" in stages else None
    if vae is None:
        from diffusers import AutoencoderKL
        vae = AutoencoderKL.from_pretrained(out / "pipeline" / "vae")
    vae.eval().requires_grad_(False)
    unet = train_unet(out, tok, text_encoder, vae, budget, seed, w)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet,
                                   scheduler=scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out / "pipeline")
    for folder in (out / "pipeline" / "tokenizer", out / "clip"):  # slow-tokenizer files too (transformers 4)
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(out / "tokenizer" / name, folder / name)
    record = {"seed": seed, "budget": budget.__dict__, "torch": torch.__version__, "threads": torch.get_num_threads()}
    if w is not world:
        record["world"] = next(k for k, v in WORLDS.items() if v is w)
    (out / "build.json").write_text(json.dumps(record))
    log(f"saved {out}")
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help=f"default {WEIGHTS} (v1 only)")
    p.add_argument("--world", choices=sorted(WORLDS), default="v1", help="v2: the staged world (needs --out)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke-sized budget (seconds)")
    p.add_argument("--stages", default="clip,vae,unet", help="stages to (re)train; others are loaded from --out")
    for f in Budget.__dataclass_fields__:
        p.add_argument(f"--{f.replace('_', '-')}", type=int, default=None)
    a = p.parse_args(argv)
    if a.out is None and a.world != "v1":
        print(f"--world {a.world} needs --out (the shipped weights in {WEIGHTS} are v1's)", file=sys.stderr)
        raise SystemExit(2)
    budget = QUICK if a.quick else BUDGETS[a.world]
    for f in Budget.__dataclass_fields__:
        if getattr(a, f) is not None:
            setattr(budget, f, getattr(a, f))
    build(a.out or WEIGHTS, budget, a.seed, tuple(a.stages.split(",")), WORLDS[a.world])


if __name__ == "__main__":
    main()
