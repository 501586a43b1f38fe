"""UCE: Unified Concept Editing (Gandikota et al. 2024), a closed-form edit of the cross-attention projections.

Every cross-attention key and value projection W (`attn2.to_k`, `attn2.to_v`) is replaced by the minimiser of

    lam ||W* - W||^2 + s_e sum_i ||W* c_i - v_i||^2 + s_p sum_j ||W* c_j - W c_j||^2

(the paper's Eq. 7): the erased concept's text embeddings c_i are sent where the original W sends its anchor's
(v_i = W c_anchor), the preserved ones c_j keep their outputs. No data, no training loop: `train.run` calls
`edit()` (closed_form = True), then exports and evaluates as for any trained method.

Rows. A text gives rows of its last-hidden-state embedding (padded to the tokenizer's length, as the UNet sees
it). The text encoder is causal, so a token's row carries every word before it and none after. Three switches say
which rows, each matching one of the released scripts (rohitgandikota/unified-concept-editing):
- `start`: where an erase pair's rows begin in each text. `last_word`: each text's last word token (both released
  scripts: `attention_mask.sum() - 2`). `change` (ours): the last token where target and anchor differ, so a word
  replaced mid-prompt ("a red ring in the style of night" -> "...circle...") starts at that word and the rows are
  aligned token for token after it; with a suffix-derived prompt ("... in the style of stripes") both agree.
- `tokens`: `tail` = from the start to the end of the shorter tail, EOS and padding included (train_erase.py);
  `last` = the start token alone (uce_sd_erase.py).
- `preserve_tokens`: a preserved text's rows. `start` = from its last word, by `tokens` (uce_sd_erase.py with
  `tokens=last`); `all` = every row, BOS and padding included (train_erase.py).
"""

from __future__ import annotations

import logging

import torch

from unlearn.data.concepts import Concept, load_concept
from unlearn.methods.base import UnlearnModule
from unlearn.models.text import encode_prompts, token_rows

log = logging.getLogger("unlearn.methods.uce")

ERASE = ("words", "prompts")
TOKENS = ("tail", "last")
STARTS = ("change", "last_word")
PRESERVE_TOKENS = ("start", "all")
PRESERVE = ("neighbours", "none")
EDITED = ("attn2.to_k", "attn2.to_v")


# ------------------------------------------------------------------------------------------------ the closed form
def closed_form_edit(weight: torch.Tensor, erase_in: torch.Tensor, erase_out: torch.Tensor,
                     preserve_in: torch.Tensor, lamb: float = 0.5, erase_scale: float = 1.0,
                     preserve_scale: float = 1.0) -> torch.Tensor:
    """W* = (lam W + s_e sum v_i c_i^T + s_p sum (W c_j) c_j^T) (lam I + s_e sum c_i c_i^T + s_p sum c_j c_j^T)^-1.

    weight (out, in); erase_in (n, in) rows c_i; erase_out (n, out) rows v_i; preserve_in (m, in) rows c_j, m >= 0.
    Solved in float64 (the right factor is symmetric positive definite for lam > 0); returned in weight's dtype.
    """
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    n_out, n_in = weight.shape
    if erase_in.ndim != 2 or erase_in.shape[1] != n_in:
        raise ValueError(f"erase_in must be (n, {n_in}) to match weight {tuple(weight.shape)}, "
                         f"got {tuple(erase_in.shape)}")
    if erase_out.ndim != 2 or erase_out.shape != (erase_in.shape[0], n_out):
        raise ValueError(f"erase_out must be ({erase_in.shape[0]}, {n_out}): one output row per erase_in row, "
                         f"in weight's output space; got {tuple(erase_out.shape)}")
    if preserve_in.ndim != 2 or preserve_in.shape[1] != n_in:
        raise ValueError(f"preserve_in must be (m, {n_in}) (m may be 0), got {tuple(preserve_in.shape)}")
    if not lamb > 0:
        raise ValueError(f"lamb must be > 0 (it keeps the system invertible), got {lamb}")
    for key, value in (("erase_scale", erase_scale), ("preserve_scale", preserve_scale)):
        if not value >= 0:
            raise ValueError(f"{key} must be >= 0, got {value}")
    f64 = {"dtype": torch.float64, "device": weight.device}
    w, ci, vi, cj = (x.detach().to(**f64) for x in (weight, erase_in, erase_out, preserve_in))
    left = lamb * w + erase_scale * vi.T @ ci + preserve_scale * (w @ cj.T) @ cj
    right = lamb * torch.eye(n_in, **f64) + erase_scale * ci.T @ ci + preserve_scale * cj.T @ cj
    # W* right = left, right symmetric  =>  right W*^T = left^T.
    return torch.linalg.solve(right, left.T).T.to(weight.dtype)


# ------------------------------------------------------------------------------------------------ text rows
def _word_ids(ids: torch.Tensor, mask: torch.Tensor) -> list[int]:
    """The token ids between BOS and EOS."""
    return ids[1:int(mask.sum()) - 1].tolist()


def change_positions(ids_a: torch.Tensor, mask_a: torch.Tensor, ids_b: torch.Tensor,
                     mask_b: torch.Tensor) -> tuple[int, int]:
    """Index, in each text, of the last token where the two differ (after it both read the same words).

    Never BOS: the common ending is capped one word short of the shorter text.
    """
    a, b = _word_ids(ids_a, mask_a), _word_ids(ids_b, mask_b)
    common = 0
    while common < min(len(a), len(b)) - 1 and a[-1 - common] == b[-1 - common]:
        common += 1
    return len(a) - common, len(b) - common  # position = 1 (BOS) + index in the word list


def last_word_position(mask: torch.Tensor) -> int:
    """Index of a text's last word token (the released scripts' `attention_mask.sum() - 2`); BOS for ""."""
    return max(int(mask.sum()) - 2, 0)


def row_slices(start_a: int, start_b: int, length: int, tokens: str) -> tuple[slice, slice]:
    """Aligned rows from each start: one (`last`) or to the end of the shorter tail (`tail`)."""
    n = 1 if tokens == "last" else length - max(start_a, start_b)
    return slice(start_a, start_a + n), slice(start_b, start_b + n)


class UCE(UnlearnModule):
    closed_form = True

    def __init__(self, components, concept, name: str = "uce", steps: int = 1, erase: str = "words",
                 tokens: str = "tail", start: str = "change", preserve_tokens: str = "start",
                 num_prompts: int | None = None, preserve: str = "neighbours", preserve_empty: bool = True,
                 lamb: float = 0.5, erase_scale: float = 1.0, preserve_scale: float = 1.0, log_every: int = 10):
        for value, allowed, key in ((erase, ERASE, "erase"), (tokens, TOKENS, "tokens"), (start, STARTS, "start"),
                                    (preserve_tokens, PRESERVE_TOKENS, "preserve_tokens"),
                                    (preserve, PRESERVE, "preserve")):
            if value not in allowed:
                raise ValueError(f"unknown {key}={value!r}; choose one of {allowed}")
        if not lamb > 0:
            raise ValueError(f"lamb must be > 0, got {lamb}")
        for key, value in (("erase_scale", erase_scale), ("preserve_scale", preserve_scale)):
            if not value >= 0:
                raise ValueError(f"{key} must be >= 0, got {value}")
        if num_prompts is not None and num_prompts < 1:
            raise ValueError(f"num_prompts must be >= 1 or null (the whole prompt set), got {num_prompts}")
        # Only the edited tensors count as "trainable": checkpoints and deltas then hold exactly what UCE changes.
        super().__init__(components, name, steps, trainable="cross_attn_kv", frozen_copy=False, log_every=log_every)
        self.concept: Concept = load_concept(concept)
        self.options = {"erase": erase, "tokens": tokens, "start": start, "preserve_tokens": preserve_tokens,
                        "num_prompts": num_prompts, "preserve": preserve,
                        "preserve_empty": preserve_empty, "lamb": lamb, "erase_scale": erase_scale,
                        "preserve_scale": preserve_scale}

    @classmethod
    def validate_config(cls, cfg: dict) -> list:
        from unlearn.validate import choice, flag

        m, out = cfg["method"], super().validate_config(cfg)
        for key, allowed in (("erase", ERASE), ("start", STARTS), ("tokens", TOKENS),
                             ("preserve_tokens", PRESERVE_TOKENS), ("preserve", PRESERVE)):
            if key in m:
                out += choice(f"method.{key}", m[key], allowed)
        if "preserve_empty" in m:
            out += flag("method.preserve_empty", m["preserve_empty"])
        return out

    # ------------------------------------------------------------------ which texts
    def texts(self) -> tuple[list[tuple[str, str]], list[str]]:
        """(erase pairs (target text, anchor text), preserved texts)."""
        o, c = self.options, self.concept
        neighbours = c.neighbour_concepts() if o["preserve"] == "neighbours" else []
        if o["erase"] == "words":  # UCE's own use: the concept's name, guided to its anchor ("Van Gogh" -> "art")
            pairs = [(c.target, c.anchor)]
            keep = [n.target for n in neighbours] + [c.anchor] + [n.anchor for n in neighbours]
        else:  # the concept's prompt set: each target prompt guided to the anchor prompt it was derived from
            pairs = [(t, a) for a, t in c.pairs(o["num_prompts"])]
            keep = [anchor for _, anchor in pairs]  # pairs hold (target, anchor): the anchors are kept
            for n in neighbours:
                keep += [t for _, t in n.pairs(o["num_prompts"])] + [a for a, _ in n.pairs(o["num_prompts"])]
        if o["preserve"] == "none":
            keep = []
        if o["preserve_empty"]:  # the unconditional branch of classifier-free guidance (train_erase.py keeps "")
            keep = [""] + keep
        erased = {t for t, _ in pairs}
        keep = [k for k in dict.fromkeys(keep) if k not in erased]  # unique; never both erase and keep a text
        return pairs, keep

    @torch.no_grad()
    def _encode(self, texts: list[str]):
        """ids, attention masks and the cross-attention inputs of `texts` (SDXL: both encoders' 2048-d states at
        the first tokenizer's positions, the pooled row left out, as the UCE authors' script edits SDXL)."""
        tok, enc = self.components.tokenizer, self.components.text_encoder
        batch = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                    return_tensors="pt")
        emb = token_rows(enc, encode_prompts(tok, enc, texts))
        return batch.input_ids, batch.attention_mask, emb

    def rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(erase inputs c_i, their anchors' inputs whose original outputs are the targets, preserved c_j)."""
        pairs, keep = self.texts()
        tokens, o = self.options["tokens"], self.options
        ids_t, mask_t, emb_t = self._encode([t for t, _ in pairs])
        ids_a, mask_a, emb_a = self._encode([a for _, a in pairs])
        length = ids_t.shape[1]
        erase_in, guide_in = [], []
        for k in range(len(pairs)):
            if o["start"] == "change":
                st, sa = change_positions(ids_t[k], mask_t[k], ids_a[k], mask_a[k])
            else:
                st, sa = last_word_position(mask_t[k]), last_word_position(mask_a[k])
            rt, ra = row_slices(st, sa, length, tokens)
            erase_in.append(emb_t[k, rt])
            guide_in.append(emb_a[k, ra])
        preserve_in = [emb_t.new_zeros(0, emb_t.shape[-1])]
        if keep:
            _, mask_p, emb_p = self._encode(keep)
            for k in range(len(keep)):
                if o["preserve_tokens"] == "all":
                    preserve_in.append(emb_p[k])
                    continue
                last = last_word_position(mask_p[k])
                preserve_in.append(emb_p[k, row_slices(last, last, length, tokens)[0]])
        return torch.cat(erase_in), torch.cat(guide_in), torch.cat(preserve_in)

    def records(self) -> dict[str, dict]:
        """edit_texts.json: every text of each row group and the row rule, enough to recompute the edit."""
        pairs, keep = self.texts()
        rule = {k: self.options[k] for k in ("erase", "start", "tokens", "preserve_tokens", "lamb", "erase_scale",
                                             "preserve_scale")}
        return {"edit_texts.json": {"erase": [t for t, _ in pairs], "guide": [a for _, a in pairs],
                                    "preserve": keep, "rule": rule}}

    # ------------------------------------------------------------------ the edit
    def edited_modules(self) -> dict[str, torch.nn.Linear]:
        return {name: m for name, m in self.unet.named_modules() if name.endswith(EDITED)}

    def edit(self) -> None:
        self.edit_rows(*self.rows())

    @torch.no_grad()
    def edit_rows(self, erase_in: torch.Tensor, guide_in: torch.Tensor, preserve_in: torch.Tensor) -> None:
        """UCE's edit of every to_k / to_v from the rows `rows()` gives (a subclass reuses them: RECE)."""
        o = self.options
        log.info("UCE: %d erase rows, %d preserved rows, tokens=%s", len(erase_in), len(preserve_in), o["tokens"])
        before, after = [], []
        for module in self.edited_modules().values():
            w = module.weight
            ci, ca, cj = (x.to(w.device, w.dtype) for x in (erase_in, guide_in, preserve_in))
            target = ca @ w.T  # v_i = W c_anchor, the original layer's answer to the anchor (bias left as it is)
            new = closed_form_edit(w, ci, target, cj, o["lamb"], o["erase_scale"], o["preserve_scale"])
            before.append(float((ci @ w.T - target).norm()))
            after.append(float((ci @ new.T - target).norm()))
            w.copy_(new)
        if not before:
            raise ValueError("this UNet has no attn2.to_k / attn2.to_v projection to edit")
        log.info("UCE: edited %d projections; erase residual ||W c_i - v_i|| summed over them %.4g -> %.4g",
                 len(before), sum(before), sum(after))
