"""AdvUnlearn: Defensive Unlearning with Adversarial Training for Robust Concept Erasure (Zhang et al., NeurIPS 2024).

The text encoder is fine-tuned (the UNet stays frozen) so that the concept prompt, even with an adversarial token
in front of it, no longer brings the concept back:

- inner attack (after `warmup_steps`, every iteration): one continuous token embedding, inserted after the start
  token, is optimised by Adam for `attack_steps` steps to *minimise* || eps(x_t, TE_cur([sot, adv, c])) -
  eps(x_t, TE_orig(c)) ||^2, i.e. to make the erased model reproduce the original model's concept prediction;
- outer step: ESD's loss on that adversarial prompt (the target from the frozen UNet conditioned by the original
  text encoder, `unlearn.losses.esd_target`) + `retain_weight` x the MSE between the UNet's prediction with the new
  text encoder's embedding of retain prompts and that with the original's.

x_t is ESD's: partial DDIM + CFG sampling of the concept (by the original encoder's embedding) stopped at a random
step, t uniform over that step's slice. The trained encoder is `components.text_encoder` itself, so the exported
pipeline folder and every in-run evaluation use it; checkpoints keep its trained tensors only.
"""

from __future__ import annotations

import copy
import re

import torch
import torch.nn.functional as F

from unlearn.data.prompts import load_prompt_set
from unlearn.losses import esd_target
from unlearn.methods.base import UnlearnModule
from unlearn.methods.distill import stop_timesteps
from unlearn.models import encode_prompts, sdxl
from unlearn.models.sampling import sample_until

ATTACK_INITS = ("random", "latest")  # a random vocabulary token each round (README command) | the last round's
LAYER = re.compile(r"(?:^|\.)encoder\.layers\.(\d+)\.")  # the layer's whole index: layer 1 is not 10 or 11


def select_text_trainable(text_encoder, layers=None, final_layer_norm: bool = True) -> list[str]:
    """Freeze the text encoder but for its encoder layers `layers` (None: every one) and, if asked, its final layer
    norm (token and position embeddings stay frozen); returns the trained parameters' names."""
    count = text_encoder.config.num_hidden_layers
    chosen = set(range(count)) if layers is None else {int(i) for i in layers}
    bad = sorted(i for i in chosen if not 0 <= i < count)
    if bad:
        raise ValueError(f"layers={list(layers)}: this text encoder has layers 0..{count - 1} (not {bad})")
    names = []
    for name, p in text_encoder.named_parameters():
        m = LAYER.search(name)
        keep = (m is not None and int(m.group(1)) in chosen) or (final_layer_norm and "final_layer_norm." in name)
        p.requires_grad_(keep)
        if keep:
            names.append(name)
    if not names:
        raise ValueError(f"layers={layers}, final_layer_norm={final_layer_norm} select no text-encoder parameter")
    return names


def insert_after_start(word_embeds: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    """(B, L, D) token embeddings with the k rows of `adv` ((k, D), shared by the batch) right after the start
    token; the prompt shifts right and the last k positions (padding unless the prompt fills the context) drop."""
    b, length, _ = word_embeds.shape
    k = adv.shape[0]
    adv = adv.to(word_embeds).unsqueeze(0).expand(b, -1, -1)
    return torch.cat([word_embeds[:, :1], adv, word_embeds[:, 1:length - k]], dim=1)


def insert_ids_after_start(ids: torch.Tensor, k: int, fill_id: int) -> torch.Tensor:
    """The token ids matching `insert_after_start`: `fill_id` at the k adversarial positions."""
    return torch.cat([ids[:, :1], ids.new_full((ids.shape[0], k), fill_id), ids[:, 1:ids.shape[1] - k]], dim=1)


def encode_embeds(text_encoder, ids: torch.Tensor, word_embeds: torch.Tensor, **kwargs):
    """Last hidden states for the token embeddings `word_embeds` (B, L, D), differentiable in them and in the
    encoder: the token-embedding layer's output is swapped through a forward hook, so the encoder's own code
    (positions, causal mask, final norm) runs unchanged. `ids` only fill the call (the hidden states ignore them;
    a pooled output reads its end-of-text position from them). With `kwargs` (output_hidden_states=True): the
    encoder's whole output."""
    layer = text_encoder.get_input_embeddings()
    handle = layer.register_forward_hook(lambda _m, _i, out: word_embeds.to(out))
    try:
        out = text_encoder(ids.to(layer.weight.device), **kwargs)
        return out if kwargs else out[0]
    finally:
        handle.remove()


def towers(text_encoder) -> list[tuple[str, torch.nn.Module]]:
    """The encoders AdvUnlearn trains, by their name under `text_encoder`: itself (SD), or SDXL's two."""
    if isinstance(text_encoder, sdxl.TextEncoders):
        return [("text_encoder.", text_encoder.text_encoder), ("text_encoder_2.", text_encoder.text_encoder_2)]
    return [("", text_encoder)]


def fill_id_of(tokenizer, pooled: bool = False) -> int:
    """The id at the adversarial positions: the pad token; for an encoder whose pooled output SDXL uses (it is read
    at the first end-of-text id), never that id: then the start token."""
    fill = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return tokenizer.bos_token_id if pooled and fill == tokenizer.eos_token_id else fill


class AdvUnlearn(UnlearnModule):
    def __init__(self, components, name: str = "advunlearn", steps: int = 1000, lr: float = 1e-5,
                 layers: list[int] | None = None, final_layer_norm: bool = True, warmup_steps: int = 200,
                 attack_steps: int = 30, attack_lr: float = 1e-3, adv_tokens: int = 1, attack_init: str = "random",
                 retain_prompts: str = "retain_coco_object", retain_batch: int = 5, retain_weight: float = 0.3,
                 exclude_concept: bool = True, negative_guidance: float = 1.0, sample_steps: int = 50,
                 guidance_scale: float = 3.0, concept_text: str | list[str] | None = None,
                 concept_target: str | list[str] | None = None, log_every: int = 10):
        if attack_init not in ATTACK_INITS:
            raise ValueError(f"unknown attack_init={attack_init!r}; choose one of {ATTACK_INITS}")
        super().__init__(components, name, steps, "all", frozen_copy=False, log_every=log_every)
        if getattr(self, "adapter", "none") != "none":  # a UNet LoRA: nothing of the UNet trains here
            raise ValueError(f"adapter={self.adapter}: AdvUnlearn trains the text encoder, not the UNet")
        self.save_hyperparameters(ignore=["components"])
        # The UNet is frozen: it is both the "original" UNet of ESD's target and the erased model's, whose text
        # encoder alone changes. No UNet tensor trains (so no UNet tensor is checkpointed or put in a delta).
        self.unet.requires_grad_(False).eval()
        self.trainable_names = []
        self.original_text_encoder = copy.deepcopy(components.text_encoder).requires_grad_(False).eval()
        self.text_encoder = components.text_encoder  # trained in place: the pipeline folder saves it
        # SDXL (paired encoders): both train, each its layers `layers`; a prompt is their packed embedding.
        self.paired = isinstance(self.text_encoder, sdxl.TextEncoders)
        self.text_trainable_names = [prefix + n for prefix, enc in towers(self.text_encoder)
                                     for n in select_text_trainable(enc, layers, final_layer_norm)]
        self.text_encoder.train()
        tok = components.tokenizer
        if self.paired:
            self.fill_ids = [fill_id_of(tok.tokenizer), fill_id_of(tok.tokenizer_2, pooled=True)]
        else:
            self.fill_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        text = concept_text if concept_text is not None else concept_target
        self.concepts = [text] if isinstance(text, str) else list(text or [])
        if not self.concepts or not all(self.concepts):
            raise ValueError(f"AdvUnlearn needs the concept's text: concept_text={concept_text!r}, "
                             f"concept_target={concept_target!r}")
        retain = load_prompt_set(retain_prompts, n=None)
        if exclude_concept:  # the released code's "filtered" lists hold no prompt of the concept
            words = [re.compile(rf"(?<!\w){re.escape(c.lower())}(?!\w)") for c in self.concepts]
            retain = [p for p in retain if not any(w.search(p.lower()) for w in words)]
        if not retain:
            raise ValueError(f"retain_prompts={retain_prompts!r}: no prompt left without the concept's word")
        self.retain_prompts = retain
        self.register_buffer("concept_ids", self.tokenize(self.concepts), persistent=False)
        self.register_buffer("retain_ids", self.tokenize(retain), persistent=False)
        encode = encode_prompts  # the original encoder's answers are constants of the training
        self.register_buffer("uncond_emb", encode(tok, self.original_text_encoder, [""]), persistent=False)
        self.register_buffer("concept_emb", encode(tok, self.original_text_encoder, self.concepts), persistent=False)
        # The last round's adversarial embedding, in checkpoints so that attack_init=latest resumes exactly. On
        # SDXL one per encoder, each of its own width, side by side: (k, D1 + D2).
        width = sum(enc.get_input_embeddings().weight.shape[1] for _, enc in towers(self.text_encoder))
        self.register_buffer("last_adv", torch.zeros(adv_tokens, width))

    @classmethod
    def validate_config(cls, cfg: dict) -> list:
        from unlearn.validate import Problem, choice, flag, number

        m, out = cfg["method"], super().validate_config(cfg)
        if cfg.get("export", "pipeline") in ("delta", "both"):
            out.append(Problem("export", cfg["export"], "pipeline with method=advunlearn (it trains the text "
                                                        "encoder; a delta holds UNet tensors only)"))
        if m.get("adapter", "none") != "none":
            out.append(Problem("method.adapter", m["adapter"], "none with method=advunlearn (it trains the text "
                                                               "encoder; an adapter is a UNet LoRA)"))
        layers = m.get("layers")
        if layers is not None and not (isinstance(layers, (list, tuple)) and layers and
                                       all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                           for i in layers) and len(set(layers)) == len(layers)):
            out.append(Problem("method.layers", layers, "null (every encoder layer) or a list of distinct "
                                                        "layer indices >= 0"))
        out += flag("method.final_layer_norm", m.get("final_layer_norm"))
        out += flag("method.exclude_concept", m.get("exclude_concept"))
        out += number("method.warmup_steps", m.get("warmup_steps"), 0, integer=True, hint=" (no attack before)")
        out += number("method.attack_steps", m.get("attack_steps"), 0, integer=True, hint=" (0 = no attack)")
        out += number("method.attack_lr", m.get("attack_lr"), 0, lo_open=True)
        out += number("method.adv_tokens", m.get("adv_tokens"), 1, integer=True)
        out += choice("method.attack_init", m.get("attack_init"), ATTACK_INITS)
        out += number("method.retain_batch", m.get("retain_batch"), 1, integer=True)
        out += number("method.retain_weight", m.get("retain_weight"), 0)
        out += number("method.negative_guidance", m.get("negative_guidance"), 0)
        out += number("method.sample_steps", m.get("sample_steps"), 1, integer=True)
        out += number("method.guidance_scale", m.get("guidance_scale"), 0)
        if not isinstance(m.get("retain_prompts"), str) or not m.get("retain_prompts"):
            out.append(Problem("method.retain_prompts", m.get("retain_prompts"), "a prompt set: a name under "
                                                                                 "unlearn/data/prompts/ or a .txt path"))
        return out

    # ------------------------------------------------------------------ pieces
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.text_encoder.parameters() if p.requires_grad]

    def configure_optimizers(self):
        return torch.optim.Adam(self.trainable_parameters(), lr=float(self.hparams.lr))  # constant, no clipping

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """(N, L) ids; SDXL: (N, 2, L), each tokenizer's."""
        tok = self.components.tokenizer

        def ids(t):
            return t(prompts, padding="max_length", max_length=t.model_max_length, truncation=True,
                     return_tensors="pt").input_ids

        return torch.stack([ids(tok.tokenizer), ids(tok.tokenizer_2)], 1) if self.paired else ids(tok)

    def word_embeds(self, ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder.get_input_embeddings()(ids).detach()  # frozen token embeddings

    def encode(self, ids: torch.Tensor, encoder=None) -> torch.Tensor:
        """The conditioning of prompts `ids` by `encoder` (default: the trained one), differentiable in it."""
        encoder = encoder or self.text_encoder
        if not self.paired:
            return encoder(ids)[0]
        return sdxl.conditioning(*(enc(ids[:, i], output_hidden_states=True)
                                   for i, (_, enc) in enumerate(towers(encoder))))

    def adversarial_cond(self, ids: torch.Tensor, adv: torch.Tensor, encoder=None) -> torch.Tensor:
        """The (current) text encoder's hidden states of the prompt `ids` (1, L) with `adv` after its start token.
        SDXL: the packed embedding, each encoder with its own slice of `adv` ((k, D1 + D2)) after its start token."""
        k = adv.shape[0]
        if not self.paired:
            return encode_embeds(encoder or self.text_encoder, insert_ids_after_start(ids, k, self.fill_id),
                                 insert_after_start(self.word_embeds(ids), adv))
        outputs, start = [], 0
        for i, (_, enc) in enumerate(towers(encoder or self.text_encoder)):
            layer = enc.get_input_embeddings()
            part, start = adv[:, start:start + layer.weight.shape[1]], start + layer.weight.shape[1]
            own = ids[:, i]
            outputs.append(encode_embeds(enc, insert_ids_after_start(own, k, self.fill_ids[i]),
                                         insert_after_start(layer(own).detach(), part), output_hidden_states=True))
        return sdxl.conditioning(*outputs)

    def eps_of(self, x_t, t, cond):
        return self.eps(self.unet, x_t, t, cond.to(self.unet.dtype))

    @torch.no_grad()
    def sample_latents(self, cond: torch.Tensor, n: int, shape, k: int | None = None):
        """ESD's x_t: DDIM + CFG from N(0, I) on `cond`, stopped after k ~ U{0..N-1} steps; t in k's slice."""
        h, sched = self.hparams, self.scheduler
        sched.set_timesteps(h.sample_steps)
        if k is None:
            k = int(torch.randint(0, h.sample_steps, ()))
        z = torch.randn((n, *shape), device=self.device, dtype=self.unet.dtype) * sched.init_noise_sigma
        x_t = sample_until(self.unet, sched, cond, self.uncond_emb, z, k, h.guidance_scale)
        return x_t, stop_timesteps(k, h.sample_steps, sched.config.num_train_timesteps, n, device=self.device), k

    def attack_objective(self, adv, ids, x_t, t, eps_concept) -> torch.Tensor:
        """What the attack minimises: the erased model's prediction for [sot, adv, concept] against the original
        model's for the concept (AdvUnlearn's attack_util.py: MSE(e_n, e_p))."""
        return F.mse_loss(self.eps_of(x_t, t, self.adversarial_cond(ids, adv)), eps_concept)

    def attack(self, index: int, init: torch.Tensor, shape) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`attack_steps` Adam steps on the adversarial embedding alone, each on a fresh x_t (as the released code);
        returns the embedding after the last step and the last objective."""
        h = self.hparams
        ids, cond = self.concept_ids[index:index + 1], self.concept_emb[index:index + 1]
        adv = init.detach().clone().requires_grad_(True)
        opt = torch.optim.Adam([adv], lr=h.attack_lr)
        loss = None
        for _ in range(h.attack_steps):
            x_t, t, _ = self.sample_latents(cond, 1, shape)
            with torch.no_grad():
                e_p = self.eps_of(x_t, t, cond)
            loss = self.attack_objective(adv, ids, x_t, t, e_p)
            (adv.grad,) = torch.autograd.grad(loss, [adv])  # this step's gradient only; no encoder gradient
            opt.step()
        return adv.detach(), loss

    def random_tokens(self) -> torch.Tensor:
        """Random vocabulary tokens' embeddings; SDXL: the same tokens in each encoder, side by side."""
        if not self.paired:
            weight = self.text_encoder.get_input_embeddings().weight
            ids = torch.randint(0, weight.shape[0], (self.hparams.adv_tokens,), device=weight.device)
            return weight[ids].detach()
        weights = [enc.get_input_embeddings().weight for _, enc in towers(self.text_encoder)]
        ids = torch.randint(0, min(w.shape[0] for w in weights), (self.hparams.adv_tokens,), device=weights[0].device)
        return torch.cat([w[ids] for w in weights], dim=-1).detach()

    def loss_terms(self, x_t, t, cond_new, cond_orig, retain_x, retain_t, retain_new, retain_orig):
        """(erase, retain): ESD's loss for the new encoder's prompt embedding `cond_new`, its target from the
        frozen UNet with the original encoder's `cond_orig`; the retain prompts' MSE, new encoder against original."""
        h = self.hparams
        with torch.no_grad():
            uncond = self.uncond_emb.expand(x_t.shape[0], -1, -1)
            e_0, e_c = self.eps_of(x_t.repeat(2, 1, 1, 1), t.repeat(2), torch.cat([uncond, cond_orig])).chunk(2)
            target = esd_target(e_0, e_c, h.negative_guidance)
            r_orig = self.eps_of(retain_x, retain_t, retain_orig)
        erase = F.mse_loss(self.eps_of(x_t, t, cond_new), target)
        retain = F.mse_loss(self.eps_of(retain_x, retain_t, retain_new), r_orig)
        return erase, retain

    # ------------------------------------------------------------------ training
    def training_step(self, batch, batch_idx):
        h = self.hparams
        shape = tuple(batch["latents"].shape[1:])
        index = int(torch.randint(0, len(self.concepts), ()))  # the released code's --seperator: one word a round
        ids, cond_orig = self.concept_ids[index:index + 1], self.concept_emb[index:index + 1]
        adversarial = h.attack_steps > 0 and self.done_iterations >= h.warmup_steps
        if adversarial:
            fresh = h.attack_init == "random" or self.done_iterations == h.warmup_steps
            adv, attack_loss = self.attack(index, self.random_tokens() if fresh else self.last_adv, shape)
            self.last_adv.copy_(adv)
            cond_new = self.adversarial_cond(ids, adv)
            self.track({"train/attack_loss": attack_loss})
        else:
            cond_new = self.encode(ids)
        pick = torch.randperm(len(self.retain_prompts))[:h.retain_batch].to(self.retain_ids.device)
        r_ids = self.retain_ids[pick]
        with torch.no_grad():
            retain_orig = self.encode(r_ids, self.original_text_encoder)
        x_t, t, k = self.sample_latents(cond_orig, 1, shape)
        retain_x, _, _ = self.sample_latents(retain_orig, len(pick), shape, k=k)  # the same DDIM stop and t,
        retain_t = t.expand(len(pick))                                             # as get_train_loss_retain
        erase, retain = self.loss_terms(x_t, t, cond_new, cond_orig, retain_x, retain_t,
                                        self.encode(r_ids), retain_orig)
        loss = erase + h.retain_weight * retain
        self.track({"train/loss": loss, "train/erase": erase, "train/retain": retain}, prog_bar=True)
        self.advance()
        return loss

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Only what trains: the text encoder's trained tensors (+ buffers such as the count and last_adv).
        keep = {f"text_encoder.{n}" for n in self.text_trainable_names}
        frozen = ("unet.", "text_encoder.", "original_text_encoder.", "components.")
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                    if k in keep or not k.startswith(frozen)}
