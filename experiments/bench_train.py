"""Training and sampling speed: tables printed to stdout (a script, never a test).

    python experiments/bench_train.py                                  # GPU: toy + SD-1.4 architecture, all tables
    python experiments/bench_train.py --models sd2,sd2_v --sd-latent 96 --tables train   # SD-2.1 architecture, 768 px
    python experiments/bench_train.py --models sdxl --sd-latent 128 --batch 1 --tables train   # SDXL 1.0, 1024 px
    OMP_NUM_THREADS=1 python experiments/bench_train.py --models toy --sd-latent 16 --iters 3   # CPU smoke

Tables:
  train     iterations/s, samples/s, peak memory and MFU per (model, method, setting). MFU = FLOPs of one iteration
            (counted by torch's FlopCounterMode on a real iteration: forward, backward, D and projection included)
            x iterations/s / the device's peak (--peak-tflops, or a known GPU's dense bf16 / fp32 peak).
            `sd14`, `sd2`, `sd2_v`, `sdxl` are UNets of SD-1.4's / SD-2.1's / SDXL 1.0's exact architecture (their
            public configs) with random weights: no download (`sd2_v` predicts v; its losses go through the ε
            conversion; `sdxl` has both text towers and takes packed embeddings, unlearn/models/sdxl.py).
  overhead  the same CDC+CPG math (paper variant) as a bare PyTorch loop vs this project's Lightning module,
            side by side on the toy model (best of --rounds alternating rounds of --iters iterations each).
  sampling  images/s of the evaluation generator (unlearn.models.generate) vs StableDiffusionPipeline.__call__,
            same prompts, steps and guidance, toy model.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import resource
import time

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from unlearn.losses import concept_preserving_gradient
from unlearn.methods.cdc_cpg import CDCCPG
from unlearn.methods.distill import SelfDistill
from unlearn.models.loading import Components, load_components
from unlearn.models.text import encode_prompts
from unlearn.nets import PatchDiscriminator

# SD-1.4's UNet2DConditionModel (CompVis/stable-diffusion-v1-4, unet/config.json): 860 M parameters.
SD14_UNET = {"sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
             "block_out_channels": (320, 640, 1280, 1280), "cross_attention_dim": 768, "attention_head_dim": 8,
             "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
             "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, "norm_num_groups": 32}
SD14_TEXT = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
             "max_position_embeddings": 77}
# SD-2.1's UNet (stabilityai/stable-diffusion-2-1, unet/config.json: linear projections, per-level head dims,
# 1024-d cross-attention; the 768 px v-model upcasts attention) and its OpenCLIP-H text tower as CLIPTextModel.
SD2_UNET = {**SD14_UNET, "cross_attention_dim": 1024, "attention_head_dim": (5, 10, 20, 20),
            "use_linear_projection": True}
SD2_TEXT = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23, "num_attention_heads": 16,
            "max_position_embeddings": 77, "hidden_act": "gelu"}
# SDXL 1.0 base (stabilityai/stable-diffusion-xl-base-1.0, unet/config.json: 2.6 B parameters, text_time added
# conditioning over 1280 pooled + 6 x 256 time features) and its two text towers (CLIP ViT-L, OpenCLIP bigG).
SDXL_UNET = {**SD2_UNET, "block_out_channels": (320, 640, 1280), "attention_head_dim": (5, 10, 20),
             "down_block_types": ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2,
             "up_block_types": ("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",), "transformer_layers_per_block": (1, 2, 10),
             "cross_attention_dim": 2048, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
             "projection_class_embeddings_input_dim": 2816}
SDXL_TEXT_2 = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
               "max_position_embeddings": 77, "hidden_act": "gelu", "projection_dim": 1280}
# Dense peak TFLOP/s (no sparsity): (bf16 tensor cores, fp32 without TF32).
PEAK_TFLOPS = {"H100": (989.0, 67.0), "H200": (989.0, 67.0), "A100": (312.0, 19.5), "L40S": (362.0, 91.6),
               "A10": (125.0, 31.2), "V100": (125.0, 15.7), "4090": (165.0, 82.6)}
SETTINGS = {  # name -> (trainer precision, speed switches)
    "default": ("32-true", {}),
    "bf16": ("bf16-mixed", {}),
    "fast": ("bf16-mixed", {"channels_last": True, "compile": True}),
    "ckpt": ("bf16-mixed", {"gradient_checkpointing": True}),
}
METHODS = {  # name -> (class, kwargs): the paper's CDC+CPG with the G step from iteration 0; SDD on data latents
    "cdc_cpg": (CDCCPG, {"warmup_steps": 0, "trainable": "all"}),
    "distill": (SelfDistill, {"latents": "data", "trainable": "cross_attn"}),
}


# ------------------------------------------------------------------------------------------------ models, data
# model -> (UNet config, text config, prediction type, extra UNet keys)
ARCHITECTURES = {"sd14": (SD14_UNET, SD14_TEXT, "epsilon", {}),
                 "sd2": (SD2_UNET, SD2_TEXT, "epsilon", {}),
                 "sd2_v": (SD2_UNET, SD2_TEXT, "v_prediction", {"upcast_attention": True}),
                 "sdxl": (SDXL_UNET, SD14_TEXT, "epsilon", {})}


def random_components(model: str, latent: int) -> Components:
    """A real architecture's UNet and text-encoder shapes, random weights; the toy tokenizer (only "" is ever
    encoded). SD-2's v-model runs through the same ε conversion as a loaded one (its scheduler's prediction_type)."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet_cfg, text_cfg, prediction, extra = ARCHITECTURES[model]
    toy = load_components("toy")
    tok = toy.tokenizer
    tok.model_max_length = text_cfg["max_position_embeddings"]
    unet = UNet2DConditionModel(**{**unet_cfg, **extra, "sample_size": latent})
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                                        bos_token_id=tok.bos_token_id, pad_token_id=tok.eos_token_id, **text_cfg))
    sched = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type=prediction)
    if model == "sdxl":  # the second tower, both paired and the UNet hooked as load_components does
        from transformers import CLIPTextModelWithProjection

        from unlearn.models import sdxl

        text_2 = CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                                             bos_token_id=tok.bos_token_id, pad_token_id=tok.eos_token_id, **SDXL_TEXT_2))
        text, tok = sdxl.TextEncoders(text, text_2.requires_grad_(False)), sdxl.Tokenizers(tok, tok)
        sdxl.install(unet, (latent * 8, latent * 8, 0, 0, latent * 8, latent * 8), SDXL_TEXT_2["projection_dim"])
    return Components(unet=unet, vae=None, text_encoder=text.requires_grad_(False), tokenizer=tok, scheduler=sched,
                      source=f"random weights, {model} architecture")


def components_for(model: str, latent: int) -> Components:
    if model != "toy" and model not in ARCHITECTURES:
        raise ValueError(f"unknown --models entry {model!r}; choose from toy, {', '.join(ARCHITECTURES)}")
    return load_components("toy") if model == "toy" else random_components(model, latent)


class RandomBatches(Dataset):
    """`batch` fixed random samples, served `length` times: one epoch covers the whole benchmark."""

    def __init__(self, unet, tokenizer, text_encoder, batch: int, length: int):
        g = torch.Generator().manual_seed(0)
        s, c = unet.config.sample_size, unet.config.in_channels
        tokens, width = encode_prompts(tokenizer, text_encoder, [""]).shape[1:]  # SDXL: packed (78, 2048)
        self.items = [{"latents": torch.randn(c, s, s, generator=g), "anchor_emb": torch.randn(tokens, width, generator=g),
                       "target_emb": torch.randn(tokens, width, generator=g)} for _ in range(batch)]
        self.length = length

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        return self.items[i % len(self.items)]


# ------------------------------------------------------------------------------------------------ measuring
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock(L.Callback):
    """Wall time from the end of iteration `warmup` to the end of the last one."""

    def __init__(self, warmup: int):
        self.warmup, self.t0, self.t1 = warmup, None, None

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        sync(module.device)
        if int(module.iteration) == self.warmup:
            self.t0 = time.perf_counter()
            if module.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(module.device)
        self.t1 = time.perf_counter()


def build(model_components: Components, method: str, steps: int, speed: dict):
    cls, kwargs = METHODS[method]
    module = cls(model_components, steps=steps, log_every=10 ** 9, **kwargs)
    module.configure_speed(**speed)
    return module


def fit(comps, method, setting, batch, iters, warmup, accelerator, callbacks=(), flop_counter=None):
    precision, speed = SETTINGS[setting]
    module = build(comps, method, warmup + iters, speed)
    trainer = L.Trainer(accelerator=accelerator, devices=1, precision=precision, logger=False, max_epochs=-1,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=list(callbacks))
    data = DataLoader(RandomBatches(comps.unet, comps.tokenizer, comps.text_encoder, batch, batch * (warmup + iters)),
                      batch_size=batch)
    with flop_counter or contextlib.nullcontext():
        trainer.fit(module, train_dataloaders=data)
    del module, trainer, data
    gc.collect()  # an SD-1.4-sized module and its Adam state before the next one is built


def peak_tflops(device, precision: str, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (bf16, fp32) in PEAK_TFLOPS.items():
        if key in name:
            return bf16 if "bf16" in precision or "16-mixed" in precision else fp32
    return None


def train_table(a, device, accelerator):
    from torch.utils.flop_counter import FlopCounterMode

    rows = []
    for model in a.models:
        for method in a.methods:
            for setting in a.settings:
                comps = components_for(model, a.sd_latent)
                counter = FlopCounterMode(display=False)
                fit(comps, method, setting, a.batch, 1, 0, accelerator, flop_counter=counter)  # one counted iteration
                flops = counter.get_total_flops()
                comps = components_for(model, a.sd_latent)
                clock = Clock(a.warmup)
                rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                fit(comps, method, setting, a.batch, a.iters, a.warmup, accelerator, callbacks=[clock])
                its = a.iters / (clock.t1 - clock.t0)
                if device.type == "cuda":
                    mem = f"{torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB"
                else:  # ru_maxrss only grows: the process's high-water mark so far (KiB on Linux)
                    mem = f"RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.2f} GiB" + \
                          ("" if resource.getrusage(resource.RUSAGE_SELF).ru_maxrss > rss0 else " (earlier peak)")
                peak = peak_tflops(device, SETTINGS[setting][0], a.peak_tflops)
                mfu = f"{100 * flops * its / (peak * 1e12):.1f} %" if peak else "n/a"
                n_it = 1000
                rows.append((model, method, setting, f"{its:.3f}", f"{its * a.batch:.2f}", mem,
                             f"{flops / a.batch / 1e9:.2f}", f"{flops * its / 1e12:.4f}", mfu, f"{n_it / its:.0f}"))
    head = ("model", "method", "setting", "it/s", "samples/s", "peak memory", "GFLOP/sample/it", "TFLOP/s", "MFU",
            f"s per 1,000 it x {a.batch}")
    print_table(f"train (batch {a.batch}, {a.iters} timed iterations after {a.warmup}; sd* latent "
                f"{a.sd_latent}x{a.sd_latent})", head, rows)


# ------------------------------------------------------------------------------------------------ overhead
def bare_cdc_cpg(comps, batch, iters, lr=4e-6, d_lr=1e-4, lam=1.0):
    """CDC+CPG (paper variant: D on eps, current UNet as the real branch, global projection), plain PyTorch."""
    unet = comps.unet.train().requires_grad_(True)
    device = next(unet.parameters()).device
    disc = PatchDiscriminator(in_channels=unet.config.out_channels, base_channels=64, norm="none").to(device)
    params = [p for p in unet.parameters()]
    opt_g = torch.optim.Adam(params, lr=lr)
    opt_d = torch.optim.Adam(disc.parameters(), lr=d_lr)
    ac = comps.scheduler.alphas_cumprod.float().to(device)
    data = RandomBatches(unet, comps.tokenizer, comps.text_encoder, batch, batch)
    x0 = torch.stack([d["latents"] for d in data.items]).to(device)
    c = torch.stack([d["anchor_emb"] for d in data.items]).to(device)
    cs = torch.stack([d["target_emb"] for d in data.items]).to(device)

    def eps(x, t, e):
        return unet(x, t, encoder_hidden_states=e).sample

    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        t = torch.randint(0, len(ac), (batch,), device=device)
        noise = torch.randn_like(x0)
        a = ac[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with torch.no_grad():
            real = eps(x_t, t, c)
        disc.requires_grad_(False)
        fake = eps(x_t, t, cs)
        logits = disc(fake)
        opt_g.zero_grad()
        F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits)).backward()
        g_u = [p.grad.clone() for p in params]
        opt_g.zero_grad()
        F.mse_loss(eps(x_t, t, c), noise).backward()
        g_r = [p.grad.clone() for p in params]
        for p, g in zip(params, concept_preserving_gradient(g_u, g_r, lam=lam, granularity="global")):
            p.grad = g
        opt_g.step()
        opt_g.zero_grad()
        disc.requires_grad_(True)
        lr_, lf = disc(real), disc(fake.detach())
        loss_d = F.binary_cross_entropy_with_logits(lr_, torch.ones_like(lr_)) + \
            F.binary_cross_entropy_with_logits(lf, torch.zeros_like(lf))
        opt_d.zero_grad()
        loss_d.backward()
        opt_d.step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


class IterTimes(L.Callback):
    def __init__(self):
        self.times, self.t0 = [], None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        sync(module.device)
        self.times.append(time.perf_counter() - self.t0)


def overhead_table(a, device, accelerator):
    """Per-iteration time of the bare loop and of Lightning + CDCCPG; first iteration of each run dropped."""
    best = {"bare PyTorch loop": float("inf"), "unlearn (Lightning, CDCCPG)": float("inf"),
            "unlearn, whole fit() / iterations": float("inf")}
    for _ in range(a.rounds):
        comps = load_components("toy")
        comps.unet.to(device)
        times = bare_cdc_cpg(comps, a.batch, a.iters + 1)
        best["bare PyTorch loop"] = min(best["bare PyTorch loop"], sum(times[1:]) / a.iters)
        comps = load_components("toy")
        cb = IterTimes()
        t0 = time.perf_counter()
        fit(comps, "cdc_cpg", "default", a.batch, a.iters, 1, accelerator, callbacks=[cb])
        whole = (time.perf_counter() - t0) / (a.iters + 1)
        best["unlearn (Lightning, CDCCPG)"] = min(best["unlearn (Lightning, CDCCPG)"], sum(cb.times[1:]) / a.iters)
        best["unlearn, whole fit() / iterations"] = min(best["unlearn, whole fit() / iterations"], whole)
    base = best["bare PyTorch loop"]
    rows = [(k, f"{1000 * v:.1f}", f"{v / base:.3f}x") for k, v in best.items()]
    print_table(f"framework overhead, CDC+CPG on the toy model (batch {a.batch}, best of {a.rounds} rounds x "
                f"{a.iters} iterations; the last row includes Trainer set-up and the first iteration)",
                ("loop", "ms / iteration", "vs bare"), rows)


# ------------------------------------------------------------------------------------------------ sampling
def sampling_table(a, device):
    from unlearn.models import generate

    comps = load_components("toy")
    for m in (comps.unet, comps.vae, comps.text_encoder):
        m.to(device)
    prompts = ["a red ring", "a blue square", "a green circle", "a yellow cross"] * (a.sample_batch // 4 or 1)
    seeds = list(range(len(prompts)))
    pipe = comps.pipeline()
    runs = {
        "unlearn.models.generate (evaluation)": lambda: generate(comps, prompts, seeds, steps=a.sample_steps,
                                                                 guidance_scale=3.0),
        "StableDiffusionPipeline.__call__": lambda: pipe(
            prompts, num_inference_steps=a.sample_steps, guidance_scale=3.0, output_type="pt",
            generator=[torch.Generator().manual_seed(s) for s in seeds]),
    }
    rows = []
    for name, fn in runs.items():
        fn()  # warm-up
        best = float("inf")
        for _ in range(a.rounds):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            best = min(best, time.perf_counter() - t0)
        rows.append((name, f"{len(prompts) / best:.2f}", f"{best:.3f}"))
    print_table(f"sampling, toy model ({len(prompts)} images a call, {a.sample_steps} DDIM steps, guidance 3, "
                f"best of {a.rounds})", ("sampler", "images/s", "s / call"), rows)


# ------------------------------------------------------------------------------------------------ main
def print_table(title, head, rows):
    print(f"\n### {title}\n")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(str(x) for x in r) + " |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tables", default="train,overhead,sampling")
    p.add_argument("--models", default="toy,sd14")
    p.add_argument("--methods", default="cdc_cpg,distill")
    p.add_argument("--settings", default=None, help="default: default,bf16,fast on GPU; default,bf16 on CPU")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations first (torch.compile compiles here)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--sd-latent", type=int, default=64, help="latent side of the sd* models: 64 = 512 px (sd2_v: 96 = 768)")
    p.add_argument("--sample-batch", type=int, default=8)
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's peak, for MFU on unknown devices")
    a = p.parse_args(argv)
    if a.warmup < 1 or a.iters < 1:
        raise ValueError(f"--warmup and --iters must be >= 1, got {a.warmup} and {a.iters}")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    accelerator = "gpu" if cuda else "cpu"
    a.models, a.methods = a.models.split(","), a.methods.split(",")
    a.settings = (a.settings or ("default,bf16,fast" if cuda else "default,bf16")).split(",")
    for s in a.settings:
        if s not in SETTINGS:
            raise ValueError(f"unknown --settings entry {s!r}; choose from {sorted(SETTINGS)}")
    name = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} thread(s)"
    print(f"device: {name}; torch {torch.__version__}; lightning {L.__version__}")
    tables = a.tables.split(",")
    if "train" in tables:
        train_table(a, device, accelerator)
    if "overhead" in tables:
        overhead_table(a, device, accelerator)
    if "sampling" in tables:
        sampling_table(a, device)


if __name__ == "__main__":
    main()
