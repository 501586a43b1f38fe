"""RECE: Reliable and Efficient Concept Erasure (Gong et al., ECCV 2024), UCE's edit hardened by closed-form
adversarial embeddings.

After UCE's edit, each round ("epoch") finds the text embedding e' that makes the *edited* cross-attention
projections W'_l answer as the *original* ones W_l answer the erased concept's embedding e:

    e' = argmin_x  sum_l ||W'_l x - W_l e||^2 + reg ||x||^2  =  M e,   M = (reg I + sum_l W'_l^T W'_l)^-1 sum_l W'_l^T W_l

(the paper's regularised closed form, "regzero": the penalty pulls toward 0; the sum runs over every attn2 to_k and
to_v, as in the released code's `close_form_emb_regzero`). M is linear and the same for every token row, so e' is M
applied row by row. Then UCE's closed form runs again on the current weights: e' is sent where the current W sends
the guide, the preserved rows keep the current W's outputs (`edit_model_adversarial`).

Switches, each a choice of the released code (CharlesGong12/RECE at 403a67f; `rece_official` takes them all):
- `guide`: null = each erased text's UCE guide (the concept's anchor); a text = every erased text guided to it, in
  both rounds (train_object.py ~214-215 and its UCE checkpoint's, UCE's train_erase.py at 35e91e2 ~391: " "
  without --guided_concepts).
- `preserve_texts`: null = UCE's preserved texts (neighbours, anchors, ""); a list = exactly these, in both rounds
  (train_object.py ~234-237 and train_erase.py ~422: [""]; train.py ~155: [" "]).
- `adv_rows`: `uce` = the adversarial rounds reuse the UCE round's rows (ours: they harden exactly what UCE erased);
  `all` = every token row of each erased text, of its guide and of each preserved text (train.py ~241-247,
  erase_methods/uce.py ~56-100: the whole padded embedding).
- `technique`: `replace` = e' is sent to W c_guide (train.py ~47, the default); `tensor` = to W c_guide minus its
  component along W e' (erase_methods/uce.py ~62-71; one projection per erased text, over all its rows).
Not followed: the code validates each round with a real classifier (NudeNet, Q16, ResNet-50) and keeps the best
round (train.py ~262-275, train_object.py ~316-327); here the last round is the result (run `epochs=k` for each k:
the edit takes well under a second).
"""

from __future__ import annotations

import logging

import torch

from unlearn.methods.uce import UCE, closed_form_edit

log = logging.getLogger("unlearn.methods.rece")

ADV_ROWS = ("uce", "all")
TECHNIQUES = ("replace", "tensor")


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


def tensor_target(erase_out: torch.Tensor, guide_out: torch.Tensor, group: int) -> torch.Tensor:
    """`technique=tensor`'s targets: per group of `group` rows (one erased text), the guide's outputs minus their
    component along the erased outputs, both taken as one vector (erase_methods/uce.py ~62-71)."""
    if erase_out.shape != guide_out.shape or erase_out.ndim != 2 or erase_out.shape[0] % group:
        raise ValueError(f"erase_out {tuple(erase_out.shape)} and guide_out {tuple(guide_out.shape)} must be the "
                         f"same (n, out) with n a multiple of group={group}")
    e, g = erase_out.reshape(-1, group * erase_out.shape[1]), guide_out.reshape(-1, group * guide_out.shape[1])
    u = e / e.norm(dim=1, keepdim=True)
    return (g - (u * g).sum(dim=1, keepdim=True) * u).reshape(guide_out.shape)


class RECE(UCE):
    """UCE's edit (the uce options), then `epochs` adversarial rounds (the adv_* options)."""

    def __init__(self, components, concept, name: str = "rece", epochs: int = 1, reg: float = 1e-3,
                 adv_lamb: float = 0.1, adv_erase_scale: float = 1.0, adv_preserve_scale: float = 0.1,
                 adv_rows: str = "uce", technique: str = "replace", guide: str | None = None,
                 preserve_texts: list[str] | None = None, **uce):
        if int(epochs) != epochs or epochs < 0:
            raise ValueError(f"epochs must be an integer >= 0 (0 = UCE alone), got {epochs}")
        for key, value in (("reg", reg), ("adv_lamb", adv_lamb)):
            if not value > 0:
                raise ValueError(f"{key} must be > 0, got {value}")
        for key, value in (("adv_erase_scale", adv_erase_scale), ("adv_preserve_scale", adv_preserve_scale)):
            if not value >= 0:
                raise ValueError(f"{key} must be >= 0, got {value}")
        for value, allowed, key in ((adv_rows, ADV_ROWS, "adv_rows"), (technique, TECHNIQUES, "technique")):
            if value not in allowed:
                raise ValueError(f"unknown {key}={value!r}; choose one of {allowed}")
        if guide is not None and not isinstance(guide, str):
            raise ValueError(f"guide must be a text or null (each pair's anchor), got {guide!r}")
        if preserve_texts is not None and (isinstance(preserve_texts, str)
                                           or not all(isinstance(t, str) for t in preserve_texts)):
            raise ValueError(f"preserve_texts must be a list of texts or null (UCE's), got {preserve_texts!r}")
        super().__init__(components, concept, name=name, **uce)
        self.options.update(epochs=int(epochs), reg=reg, adv_lamb=adv_lamb, adv_erase_scale=adv_erase_scale,
                            adv_preserve_scale=adv_preserve_scale, adv_rows=adv_rows, technique=technique,
                            guide=guide, preserve_texts=None if preserve_texts is None else list(preserve_texts))

    @classmethod
    def validate_config(cls, cfg: dict) -> list:
        from unlearn.validate import Problem, choice

        m, out = cfg["method"], super().validate_config(cfg)
        for key, allowed in (("adv_rows", ADV_ROWS), ("technique", TECHNIQUES)):
            if key in m:
                out += choice(f"method.{key}", m[key], allowed)
        if m.get("guide") is not None and not isinstance(m["guide"], str):
            out.append(Problem("method.guide", m["guide"], "a text, or null (each pair's anchor)"))
        texts = m.get("preserve_texts")
        if texts is not None and (not isinstance(texts, list) or not all(isinstance(t, str) for t in texts)):
            out.append(Problem("method.preserve_texts", texts, "a list of texts, or null (UCE's preserved texts)"))
        return out

    def texts(self) -> tuple[list[tuple[str, str]], list[str]]:
        pairs, keep = super().texts()
        o = self.options
        if o["guide"] is not None:
            pairs = [(t, o["guide"]) for t, _ in pairs]
        if o["preserve_texts"] is not None:
            erased = {t for t, _ in pairs}
            keep = [k for k in dict.fromkeys(o["preserve_texts"]) if k not in erased]
        return pairs, keep

    def adversarial_rows(self, uce_rows: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """(erased rows e, guide rows, preserved rows, rows per erased text) of the adversarial rounds."""
        if self.options["adv_rows"] == "uce":
            return (*uce_rows, len(uce_rows[0]))
        pairs, keep = self.texts()
        emb_t, emb_g = self._encode([t for t, _ in pairs])[2], self._encode([g for _, g in pairs])[2]
        emb_p = self._encode(keep)[2] if keep else emb_t.new_zeros(0, *emb_t.shape[1:])
        width = emb_t.shape[-1]
        return emb_t.reshape(-1, width), emb_g.reshape(-1, width), emb_p.reshape(-1, width), emb_t.shape[1]

    def records(self) -> dict[str, dict]:
        out = super().records()
        out["edit_texts.json"]["rule"].update({k: self.options[k] for k in (
            "epochs", "reg", "adv_lamb", "adv_erase_scale", "adv_preserve_scale", "adv_rows", "technique")})
        return out

    @torch.no_grad()
    def edit(self) -> None:
        modules = list(self.edited_modules().values())
        original = [m.weight.detach().clone() for m in modules]
        uce_rows = self.rows()
        self.edit_rows(*uce_rows)  # the UCE round
        o = self.options
        erase_in, guide_in, preserve_in, group = self.adversarial_rows(uce_rows)
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
                target = ca @ w.T
                if o["technique"] == "tensor":
                    target = tensor_target(ci @ w.T, target, group)
                w.copy_(closed_form_edit(w, ci, target, cj, o["adv_lamb"], o["adv_erase_scale"],
                                         o["adv_preserve_scale"]))
