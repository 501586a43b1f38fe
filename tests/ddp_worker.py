"""One training iteration of each case on a fixed global batch, under a trainer config; saves the trained tensors.

    python tests/ddp_worker.py <pipeline folder> <trainer config name> <global batch> <out dir>

tests/test_ddp.py runs it with `trainer=ddp_cpu` (2 processes; Lightning's `ddp` strategy re-runs this script once
per extra rank) and compares with `run_cases(..., "cpu", ...)` in one process. Every sample carries its own noise and
timestep (`FixedNoise`), so a sample's draw does not depend on which rank holds it: the two runs see the same
global batch and, if DDP is right, make the same update.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

CONF = Path(__file__).resolve().parents[1] / "conf"
N_SAMPLES, TOKENS, WIDTH = 4, 16, 16  # the tiny pipeline's text encoder: 16 tokens x 16 features

# name -> (method config, overrides): the paper's CDC+CPG (global projection), a per-tensor normalised projection
# with the frozen real branch and x0 inputs (cdc_cpg_tuned's, BatchNorm left out: see conf/trainer/ddp_cpu.yaml),
# and self-distillation with the EMA teacher and gradient clipping.
CASES = {
    "cdc_cpg": ("cdc_cpg", ["method.steps=1", "method.warmup_steps=0", "method.lr=1e-3"]),
    "cdc_cpg_per_tensor": ("cdc_cpg_tuned", ["method.steps=1", "method.warmup_steps=0", "method.lr=1e-3",
                                                "method.discriminator.norm=none"]),
    "distill": ("distill", ["method.steps=1", "method.latents=data", "method.lr=1e-3", "method.ema_decay=0.5",
                            "method.max_grad_norm=1e-3"]),
}


class FixedNoise:
    """`noise()` returns each sample's own eps and t from the batch instead of drawing them."""

    def training_step(self, batch, batch_idx):
        self._fixed = batch["eps"], batch["t"]
        return super().training_step(batch, batch_idx)

    def on_train_start(self):
        """Record the gradient each optimizer steps with (after all-reduce, projection and clipping)."""
        names = {id(p): n for n, p in self.named_parameters()}
        self.step_grads = {}

        def record(opt, args, kwargs):
            self.step_grads.update({names[id(p)]: p.grad.detach().clone() for g in opt.param_groups
                                    for p in g["params"] if p.grad is not None})

        for opt in self.trainer.optimizers:
            opt.register_step_post_hook(record)  # post: automatic optimisation backpropagates inside step()

    def noise(self, latents, t=None):
        eps, t = self._fixed
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        return a.sqrt() * latents + (1 - a).sqrt() * eps, eps, t


def global_batch(seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"latents": torch.randn(4, 8, 8, generator=g), "anchor_emb": torch.randn(TOKENS, WIDTH, generator=g),
             "target_emb": torch.randn(TOKENS, WIDTH, generator=g), "eps": torch.randn(4, 8, 8, generator=g),
             "t": torch.randint(0, 1000, (), generator=g)} for _ in range(N_SAMPLES)]


def run_case(pipeline: str, case: str, trainer_name: str, batch_size: int) -> tuple[L.Trainer, L.LightningModule]:
    from unlearn.models.loading import load_components

    method, overrides = CASES[case]
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"method={method}", f"trainer={trainer_name}", *overrides])
    L.seed_everything(0)
    kwargs = OmegaConf.to_container(cfg.method, resolve=True)
    cls = get_class(kwargs.pop("_target_"))
    module = type(f"Fixed{cls.__name__}", (FixedNoise, cls), {})(load_components(pipeline), **kwargs)
    module.initial_tensors = trained_tensors(module)
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False, max_steps=-1, max_epochs=-1)
    trainer.fit(module, train_dataloaders=DataLoader(global_batch(), batch_size=batch_size))
    return trainer, module


def trained_tensors(module) -> dict[str, torch.Tensor]:
    """What one iteration changes: the UNet's trainable tensors, D's weights, the EMA teacher's trained tensors."""
    out = {f"unet.{n}": p.detach().clone() for n, p in module.unet.named_parameters() if n in module.trainable_names}
    for part in ("disc", "teacher"):
        if hasattr(module, part):
            out.update({f"{part}.{n}": v.detach().clone() for n, v in getattr(module, part).state_dict().items()})
    return out


def run_cases(pipeline: str, trainer_name: str, batch_size: int) -> dict[str, dict[str, torch.Tensor]]:
    results = {}
    for case in CASES:
        trainer, module = run_case(pipeline, case, trainer_name, batch_size)
        results[case] = {"rank": trainer.global_rank, "world_size": trainer.world_size,
                         "iterations": int(module.iteration), "tensors": trained_tensors(module),
                         "initial": module.initial_tensors, "grads": module.step_grads}
    return results


if __name__ == "__main__":
    torch.set_num_threads(1)
    pipeline_dir, trainer_cfg, batch, out_dir = sys.argv[1:5]
    res = run_cases(pipeline_dir, trainer_cfg, int(batch))
    rank = next(iter(res.values()))["rank"]
    torch.save(res, Path(out_dir) / f"rank{rank}.pt")
