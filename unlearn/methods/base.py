"""What every unlearning method shares: the model parts, which UNet weights train, noising, export.

A method subclasses `UnlearnModule` and writes `training_step`; "steps" are training iterations (Lightning's
global_step counts optimizer steps, twice per iteration when two optimizers step). Every subclass also takes
`adapter` and `lora` (conf/adapter/default.yaml, merged into every method's config): `adapter=lora` trains a LoRA
on the subset `trainable` selects instead of the subset itself (unlearn/methods/adapters.py), with no code in the
method; `trainable_names` and `trainable_parameters()` are then the LoRA's.
"""

from __future__ import annotations

import copy
import functools
import inspect
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities.warnings import PossibleUserWarning

from unlearn.methods.adapters import ADAPTERS, add_lora, has_lora, lora_state, lora_targets, merge_lora
from unlearn.models.loading import Components, save_pipeline
from unlearn.models.prediction import eps_from_prediction, prediction_type_of

# The frozen parts (the original UNet, the EMA teacher, frozen layers of the trained one) are in eval mode on
# purpose; Lightning's count of eval-mode modules at the start of training tells a user nothing. Only that warning.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training",
                        category=PossibleUserWarning)

TRAINABLE = {
    "all": lambda name: True,
    "cross_attn": lambda name: "attn2." in name,
    "cross_attn_kv": lambda name: "attn2.to_k" in name or "attn2.to_v" in name,
    "non_cross_attn": lambda name: "attn2." not in name,  # ESD-u's choice
}


def first_samples(batch: dict, n: int | None) -> dict:
    """The batch cut to its first n samples (tensors and lists alike); n None keeps it whole.

    For methods whose released code trains on a batch of one (ESD, SDD) while the data module batches for all.
    """
    if n is None:
        return batch
    return {k: v[:n] if isinstance(v, (torch.Tensor, list, tuple)) else v for k, v in batch.items()}


def select_trainable(unet: torch.nn.Module, trainable: str) -> list[str]:
    """Freeze the UNet but for the parameters `trainable` names; returns their names."""
    if trainable not in TRAINABLE:
        raise ValueError(f"unknown trainable={trainable!r}; choose one of {sorted(TRAINABLE)}")
    keep = TRAINABLE[trainable]
    names = []
    for name, p in unet.named_parameters():
        p.requires_grad_(keep(name))
        if keep(name):
            names.append(name)
    if not names:
        raise ValueError(f"trainable={trainable!r} selects no parameter of this UNet")
    return names


LORA_KEYS = ("rank", "alpha", "dropout")
_UNSET = object()


def _taking_adapter(init):
    """`init` that also takes `adapter` and `lora` as keywords, whatever its own signature, and leaves them where
    `UnlearnModule.__init__` reads them: so a method's module and its signature need nothing for adapters. The
    outermost constructor (RECE's, not the UCE one it calls) holds the caller's values."""
    @functools.wraps(init)
    def wrapper(self, *args, adapter=_UNSET, lora=_UNSET, **kwargs):
        if adapter is not _UNSET or lora is not _UNSET:
            object.__setattr__(self, "_adapter_request", (adapter, lora))  # before nn.Module's own __init__
        init(self, *args, **kwargs)

    # The signature stays `init`'s (functools.wraps): Lightning's save_hyperparameters reads the method's own
    # arguments from its frame by that signature. Validation adds these two (`shared_parameters`).
    return wrapper


class UnlearnModule(L.LightningModule):
    # A closed-form method (UCE) sets this and implements `edit()`: `train.run` then calls `edit()` instead of
    # `Trainer.fit`, prepares no data, and exports and evaluates the result as for any trained method.
    closed_form = False
    # Why the method cannot run on SDXL (two text encoders, added conditioning: unlearn/models/sdxl.py), or None:
    # validation refuses model=sdxl with it by this reason, before anything loads.
    sdxl_refusal: str | None = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "__init__" in vars(cls):
            cls.__init__ = _taking_adapter(vars(cls)["__init__"])

    def __init__(self, components: Components, name: str, steps: int, trainable: str = "all",
                 frozen_copy: bool = False, log_every: int = 10):
        adapter, lora = self.__dict__.pop("_adapter_request", ("none", None))
        adapter = "none" if adapter is _UNSET else adapter
        lora = {} if lora in (None, _UNSET) else dict(lora)
        if adapter not in ADAPTERS:
            raise ValueError(f"unknown adapter={adapter!r}; choose one of {ADAPTERS}")
        if adapter == "lora" and self.closed_form:
            raise ValueError(f"adapter=lora: {name} is a closed-form edit, with no training for a LoRA")
        unknown = sorted(set(lora) - set(LORA_KEYS))
        if unknown:
            raise ValueError(f"lora.{unknown[0]}: not a LoRA setting; it takes {', '.join(LORA_KEYS)}")
        if adapter == "lora" and set(lora) != set(LORA_KEYS):
            raise ValueError(f"adapter=lora needs lora with {', '.join(LORA_KEYS)} (conf/adapter/default.yaml)")
        super().__init__()
        self.components = components
        self.method_name = name
        self.steps = int(steps)
        self.log_every = log_every
        self.unet = components.unet
        self.unet.train()
        self.trainable_names = select_trainable(self.unet, trainable)
        # The original model, frozen, for methods whose targets come from it (ESD, SDD teacher init, DoCo).
        self.original = copy.deepcopy(self.unet).requires_grad_(False).eval() if frozen_copy else None
        # After the frozen copy, which stays the plain original. A copy a method makes later from `self.unet` (the
        # EMA teacher) holds the LoRA too, so it pairs with the student tensor for tensor.
        self.adapter, self.lora = adapter, lora
        if adapter == "lora":
            self.trainable_names = add_lora(self.unet, lora_targets(self.unet, self.trainable_names), **lora)
        self.lora_tensors: dict[str, torch.Tensor] | None = None  # the LoRA file's, kept when it is merged
        self.scheduler = components.scheduler
        self.register_buffer("alphas_cumprod", components.scheduler.alphas_cumprod.clone().float(), persistent=False)
        self.prediction_type = prediction_type_of(components.scheduler)  # what the UNet predicts: see eps()
        # The count twice: a buffer, so checkpoints and DDP broadcasts carry it, and a Python int that the loop
        # reads (warm-up, stop, checkpoint names), so no iteration waits on the device to learn where it is.
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))
        self.done_iterations = 0
        self.strict_loading = False  # checkpoints keep only what trains
        self._t0 = None
        self._pending_logs: dict[str, tuple[torch.Tensor, bool]] = {}

    @classmethod
    def validate_config(cls, cfg: dict) -> list:
        """Rules every method shares, checked before any model loads (unlearn/validate.py); a method adds its own
        by overriding this and extending `super().validate_config(cfg)`. `cfg` is the whole resolved config."""
        from unlearn.validate import Problem, choice, number

        m, out = cfg["method"], []
        if not isinstance(m.get("name"), str) or not m.get("name"):
            out.append(Problem("method.name", m.get("name"), "a non-empty name (it names the run and its rows)"))
        if "steps" in m:
            out += number("method.steps", m["steps"], 1, integer=True, hint=" (training iterations)")
        if "trainable" in m:
            out += choice("method.trainable", m["trainable"], TRAINABLE)
        if "lr" in m:
            out += number("method.lr", m["lr"], 0, lo_open=True)
        if "max_grad_norm" in m:
            out += number("method.max_grad_norm", m["max_grad_norm"], 0, lo_open=True, optional=True,
                          hint=" (null = no clipping)")
        if "log_every" in m:
            out += number("method.log_every", m["log_every"], 1, integer=True)
        return out + cls.adapter_problems(m)

    @classmethod
    def shared_parameters(cls) -> dict[str, inspect.Parameter]:
        """The keywords every method takes beside its own signature's (the config's unknown-key check reads them)."""
        return {n: inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d)
                for n, d in (("adapter", "none"), ("lora", None))}

    @classmethod
    def adapter_problems(cls, m: dict) -> list:
        from unlearn.validate import Problem, choice, number, unknown_key

        adapter, lora = m.get("adapter", "none"), m.get("lora") or {}
        out = choice("method.adapter", adapter, ADAPTERS)
        if adapter == "lora" and cls.closed_form:
            out.append(Problem("method.adapter", adapter, f"not for {m.get('name')} ({cls.__name__}), a closed-form "
                                                          "edit with no training for a LoRA; adapter=none"))
        if not isinstance(lora, dict):
            return [*out, Problem("method.lora", lora, "a mapping of " + ", ".join(LORA_KEYS))]
        out += [unknown_key(f"method.lora.{k}", v, LORA_KEYS, "the LoRA") for k, v in lora.items() if k not in LORA_KEYS]
        if "rank" in lora:
            out += number("method.lora.rank", lora["rank"], 1, integer=True)
        if "alpha" in lora:
            out += number("method.lora.alpha", lora["alpha"], 0, lo_open=True, hint=" (the LoRA's scale is alpha / rank)")
        if "dropout" in lora:
            out += number("method.lora.dropout", lora["dropout"], 0, 1, hi_open=True)
        return out

    # ------------------------------------------------------------------ helpers
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.unet.parameters() if p.requires_grad]

    def noise(self, latents: torch.Tensor, t: torch.Tensor | None = None):
        """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps, t uniform over the training schedule."""
        if t is None:
            t = torch.randint(0, len(self.alphas_cumprod), (latents.shape[0],), device=latents.device)
        eps = torch.randn_like(latents)
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        return a.sqrt() * latents + (1 - a).sqrt() * eps, eps, t

    def predict_x0(self, x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        return (x_t - (1 - a).sqrt() * eps) / a.sqrt()

    def eps(self, unet, x_t, t, emb):
        """The UNet's prediction as ε, whatever the model predicts (ε or v): the one place every method's losses,
        targets and discriminator inputs get their noise predictions from (unlearn/models/prediction.py)."""
        out = unet(x_t, t, encoder_hidden_states=emb).sample
        return eps_from_prediction(out, x_t, self.alphas_cumprod[t], self.prediction_type)

    def configure_speed(self, **options) -> None:
        """Apply conf/speed's switches (unlearn.methods.speed.apply_speed) to every UNet the method holds: the
        trained one and its frozen copies (original, EMA teacher)."""
        from diffusers import UNet2DConditionModel

        from unlearn.methods.speed import apply_speed

        for name, child in self.named_children():
            if isinstance(child, UNet2DConditionModel):
                apply_speed(child, trainable=child is self.unet, **options)

    def edit(self) -> None:
        """The whole method for a closed-form one (`closed_form = True`); trained methods never call it."""
        raise NotImplementedError(f"{type(self).__name__} trains; it has no closed-form edit")

    # ------------------------------------------------------------------ loop bookkeeping
    def track(self, values: dict[str, torch.Tensor], prog_bar: bool = False) -> None:
        """Statistics to log, kept on the device (detached) and handed to Lightning every `log_every` iterations
        and at the last: logging a tensor each iteration would read it back (a sync) at every progress-bar
        refresh. The logged value is the latest one."""
        self._pending_logs.update({k: (v.detach() if torch.is_tensor(v) else v, prog_bar) for k, v in values.items()})

    def logs_this_iteration(self) -> bool:
        """Whether the iteration under way hands its statistics to Lightning (advance() flushes them): a
        statistic that costs work, not only a read, is computed only then."""
        return self.is_log_iteration(self.done_iterations + 1)

    def is_log_iteration(self, it: int) -> bool:
        """Iteration `it` (1-based) hands statistics to Lightning: every `log_every`-th and the last."""
        return it % self.log_every == 0 or it >= self.steps

    def advance(self) -> None:
        """Count one iteration; stop the trainer after `steps` of them; log throughput and tracked statistics."""
        self.done_iterations += 1
        it = self.done_iterations
        self.iteration.fill_(it)  # a device write, no read back
        if self._t0 is None:
            self._t0 = (time.perf_counter(), it)
        last = it >= self.steps
        if self.is_log_iteration(it):
            t0, i0 = self._t0
            if it > i0:
                self.log("perf/steps_per_s", (it - i0) / (time.perf_counter() - t0), prog_bar=True)
            self.log("iteration", float(it))
            for bar in (True, False):
                chosen = {k: v for k, (v, b) in self._pending_logs.items() if b is bar}
                if chosen:
                    self.log_dict(chosen, prog_bar=bar)
            self._pending_logs.clear()
        if last:
            self.trainer.should_stop = True

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Before the weights are loaded: the host-side count follows the checkpoint's buffer.
        self.done_iterations = int(checkpoint["state_dict"].get("iteration", 0))

    def setup(self, stage: str) -> None:
        # Every rank was seeded alike (train.run): offset the stream per rank, or all ranks would draw the same
        # timesteps and noise for their different samples. One process keeps the stream exactly as it was.
        if self.trainer is not None and self.trainer.world_size > 1:
            torch.manual_seed(torch.initial_seed() + self.trainer.global_rank)
        # 16-mixed scales the loss; Lightning unscales only inside optimizer.step, so a clip inside a manual
        # training_step would clip scaled gradients. bf16-mixed has no scaler.
        max_norm = getattr(self.hparams, "max_grad_norm", None)
        if not self.automatic_optimization and max_norm and \
                getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            raise ValueError(f"trainer.precision={self.trainer.precision!r} with method.max_grad_norm={max_norm}: "
                             "this method clips inside its training step, before Lightning unscales the fp16 "
                             "gradients; use trainer.precision=bf16-mixed (or 32-true)")

    def on_train_batch_start(self, batch, batch_idx):
        if self.done_iterations >= self.steps:  # resumed after the last step: nothing left to do
            self.trainer.should_stop = True
            return -1
        return None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Frozen weights are re-read from the model folder; a checkpoint holds only what training changes.
        keep = {f"unet.{n}" for n in self.trainable_names}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                    if k in keep or not k.startswith(("unet.", "original.", "components."))}

    def merge_adapter(self) -> None:
        """After training, before anything is exported or measured: merge the LoRA into every UNet holding one (the
        trained one, the EMA teacher), keeping the exported UNet's LoRA for its file first. `trainable_names` then
        names the merged weights, which a delta holds. Once; a no-op without an adapter."""
        if self.adapter != "lora" or self.lora_tensors is not None:
            return
        self.lora_tensors = lora_state(self.export_unet())
        for child in self.children():
            if has_lora(child):
                self.trainable_names = merge_lora(child)

    def export(self, folder: str | Path) -> Path:
        """The deliverable: a folder StableDiffusionPipeline.from_pretrained loads (with a LoRA: merged)."""
        self.merge_adapter()
        return save_pipeline(self.components, folder, unet=self.export_unet())

    def export_unet(self):
        return self.unet

    def records(self) -> dict[str, dict]:
        """JSON files for the run folder (name -> payload) that say how the result was made; none by default."""
        return {}
