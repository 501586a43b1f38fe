"""Whether a neighbour was kept, as a user means it: it still shows (CA), still matches its prompts (CS) and still
looks like the original's images (FID against them), each within a stated bound of the original model's row.

CA alone is not enough: a model that draws dark noise for every prompt can keep a neighbour's CA at 100 % on the toy
world (its CLIP still ranks the right class first among the neighbours) while its CS falls from ~210 to ~27 and its
FID rises to ~1.7. The bounds live in the eval config (`eval.kept`); FID's scale depends on the features (the toy
world's CLIP, Inception on real models), so its bound comes from the model config (`model.kept_fid_max`; null = not
checked, said in the verdict).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KeptBounds:
    ca_ratio: float = 0.9          # CA after >= ca_ratio x CA before
    cs_ratio: float = 0.9          # CS after >= cs_ratio x CS before
    fid_max: float | None = 0.2    # FID of the after-images against the original's <= fid_max; None = unchecked


def neighbour_verdict(before: dict, after: dict, bounds: KeptBounds) -> list[str]:
    """The bounds one neighbour's row breaks (empty = kept); a measure missing from a row counts as broken."""
    broken = []
    for key, ratio in (("ca", bounds.ca_ratio), ("cs", bounds.cs_ratio)):
        if key in before and key not in after:
            broken.append(f"{key.upper()} missing")
        elif key in before and after[key] < ratio * before[key]:
            broken.append(f"{key.upper()} {after[key]:.1f} < {ratio:g} x {before[key]:.1f}")
    if bounds.fid_max is not None:
        fid = after.get("fid")
        if fid is None:
            broken.append("FID missing")
        elif fid > bounds.fid_max:
            broken.append(f"FID {fid:.2f} > {bounds.fid_max:g}")
    return broken


def kept_neighbours(before: dict, after: dict, target: str, bounds: KeptBounds) -> dict[str, list[str]]:
    """{neighbour: the bounds it breaks} for every neighbour concept of a results row (target and implicit out)."""
    return {c: neighbour_verdict(row, after.get(c, {}), bounds) for c, row in before.items()
            if c not in (target, "implicit")}


def kept_column(results: dict, target: str, bounds: KeptBounds) -> dict[str, dict]:
    """compare's extra column: per method, "k/n" neighbours kept by CA, CS and FID together."""
    before = results["original"]
    out = {}
    for label, after in results.items():
        if label == "original":
            continue
        verdicts = kept_neighbours(before, after, target, bounds)
        out[label] = {"kept (CA, CS, FID)": f"{sum(not v for v in verdicts.values())}/{len(verdicts)}"}
    return out
