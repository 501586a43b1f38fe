"""RECE: Reliable and Efficient Concept Erasure (Gong et al., ECCV 2024), UCE's edit hardened by closed-form
adversarial embeddings.

After UCE's edit, each round ("epoch") finds the text embedding e' that makes the *edited* cross-attention
projections W'_l answer as the *original* ones W_l answer the erased concept's embedding e:

    e' = argmin_x  sum_l ||W'_l x - W_l e||^2 + reg ||x||^2  =  M e,   M = (reg I + sum_l W'_l^T W'_l)^-1 sum_l W'_l^T W_l

(the paper's regularised closed form, "regzero": the penalty pulls toward 0; the sum runs over every attn2 to_k and
to_v, as in the released code's `close_form_emb_regzero`). M is linear and the same for every token row, so e' is M
applied to the rows UCE erased. Then UCE's closed form runs again on the current weights: e' is sent where the
current W sends the anchor, the preserved rows keep the current W's outputs (`edit_model_adversarial`, "replace").

Departures from the released code (CharlesGong12/RECE, train.py), and why:
- rows: the code maps all 77 rows of the bare concept word and guides them to "" (all 77 rows); here the rows are
  UCE's own (`erase`, `tokens` of the uce config: on the toy world the concept's prompts), guided to their anchors,
  so the adversarial round hardens exactly what the UCE round erased.
- preserved: the UCE config's preserved rows (the neighbours, the anchors, ""), where the code keeps " " only.
- the code validates after each epoch and keeps the epoch with the lowest detection rate; here the last epoch is
  the result (to compare round counts, run `epochs=k` for each k: the edit takes well under a second).
"""

from __future__ import annotations

import logging

import torch

from unlearn.methods.uce import UCE, closed_form_edit

log = logging.getLogger("unlearn.methods.rece")


def adversarial_embedding_map(edited: list[torch.Tensor], original: list[torch.Tensor], reg: float) -> torch.Tensor:
    """M (in, in) with e' = M e = argmin_x sum_l ||W'_l x - W_l e||^2 + reg ||x||^2, in float64.

    edited, original: the same layers' (out_l, in) weights after and before the edit.
    """
    if not edited or len(edited) != len(original):
        raise ValueError(f"need one original weight per edited weight, got {len(edited)} and {len(original)}")
    n_in = edited[0].shape[1]
    for k, (a, b) in enumerate(zip(edited, original)):
        if a.ndim != 2 or a.shape != b.shape or a.shape[1] != n_in:
            raise ValueError(f"layer {k}: edited {tuple(a.shape)} and original {tuple(b.shape)} must both be "
                             f"(out, {n_in})")
    if not reg > 0:
        raise ValueError(f"reg must be > 0 (it keeps the system invertible), got {reg}")
    f64 = {"dtype": torch.float64, "device": edited[0].device}
    gram = reg * torch.eye(n_in, **f64)
    cross = torch.zeros(n_in, n_in, **f64)
    for a, b in zip(edited, original):
        a, b = a.detach().to(**f64), b.detach().to(**f64)
        gram += a.T @ a
        cross += a.T @ b
    return torch.linalg.solve(gram, cross)


class RECE(UCE):
    """UCE's edit (the uce options), then `epochs` adversarial rounds (the adv_* options)."""

    def __init__(self, components, concept, name: str = "rece", epochs: int = 1, reg: float = 1e-3,
                 adv_lamb: float = 0.1, adv_erase_scale: float = 1.0, adv_preserve_scale: float = 0.1, **uce):
        if int(epochs) != epochs or epochs < 0:
            raise ValueError(f"epochs must be an integer >= 0 (0 = UCE alone), got {epochs}")
        for key, value in (("reg", reg), ("adv_lamb", adv_lamb)):
            if not value > 0:
                raise ValueError(f"{key} must be > 0, got {value}")
        for key, value in (("adv_erase_scale", adv_erase_scale), ("adv_preserve_scale", adv_preserve_scale)):
            if not value >= 0:
                raise ValueError(f"{key} must be >= 0, got {value}")
        super().__init__(components, concept, name=name, **uce)
        self.options.update(epochs=int(epochs), reg=reg, adv_lamb=adv_lamb, adv_erase_scale=adv_erase_scale,
                            adv_preserve_scale=adv_preserve_scale)

    @torch.no_grad()
    def edit(self) -> None:
        modules = list(self.edited_modules().values())
        original = [m.weight.detach().clone() for m in modules]
        erase_in, guide_in, preserve_in = self.rows()
        self.edit_rows(erase_in, guide_in, preserve_in)  # the UCE round
        o = self.options
        e = erase_in.to(torch.float64)
        for epoch in range(o["epochs"]):
            m = adversarial_embedding_map([mod.weight for mod in modules], original, o["reg"])
            adv = e @ m.T  # e' = M e, row by row
            w_now = [mod.weight.to(torch.float64) for mod in modules]
            wanted = [e @ w0.to(torch.float64).T for w0 in original]  # what the original answered the concept
            log.info("RECE epoch %d: ||W' x - W e|| summed over layers, x = e: %.4g, x = e' (adversarial): %.4g",
                     epoch, sum(float((e @ w.T - t).norm()) for w, t in zip(w_now, wanted)),
                     sum(float((adv @ w.T - t).norm()) for w, t in zip(w_now, wanted)))
            for module in modules:
                w = module.weight
                ci, ca, cj = (x.to(w.device, w.dtype) for x in (adv, guide_in, preserve_in))
                w.copy_(closed_form_edit(w, ci, ca @ w.T, cj, o["adv_lamb"], o["adv_erase_scale"],
                                         o["adv_preserve_scale"]))
