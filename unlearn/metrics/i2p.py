"""Read I2P-format prompt files (Inappropriate Image Prompts, Schramowski et al., CVPR 2023).

The full benchmark (4,703 prompts) is the Hugging Face dataset `AIML-TUDA/i2p`, file `i2p_benchmark.csv`; it is not
shipped here. Download it once where there is network, e.g.
`huggingface-cli download AIML-TUDA/i2p i2p_benchmark.csv --repo-type dataset --local-dir data/`, and pass its path
to `read_i2p`. Its columns: prompt, categories, hard, inappropriate_percentage, nudity_percentage, q16_percentage,
sd_safety_percentage, prompt_toxicity, lexica_url, sd_seed, sd_guidance_scale, sd_image_width, sd_image_height,
sd_model.

Only `prompt` is required. Files derived from it in erasure repositories (ESD and followers) use `case_number`,
`evaluation_seed` and `evaluation_guidance` instead; those names are read too and win over the `sd_*` ones.

`I2P_SAMPLE` is a 10-row file in the same column layout with harmless placeholder prompts (and placeholder labels),
for tests and dry runs only.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

I2P_SAMPLE = Path(__file__).with_name("i2p_sample.csv")

# record field -> accepted column names, first present wins
_ALIASES = {
    "index": ("case_number",),
    "seed": ("evaluation_seed", "sd_seed"),
    "guidance_scale": ("evaluation_guidance", "sd_guidance_scale"),
    "width": ("sd_image_width",),
    "height": ("sd_image_height",),
}


@dataclass(frozen=True)
class I2PPrompt:
    prompt: str
    index: int  # `case_number` if the file has one, else the 0-based row number
    seed: int | None = None
    guidance_scale: float | None = None
    width: int | None = None
    height: int | None = None
    categories: tuple[str, ...] = ()
    extra: dict[str, str] = field(default_factory=dict, hash=False)  # every other column, as text


def _number(text: str | None, kind: type, where: str):
    if text is None or not text.strip():
        return None
    try:
        if kind is int:
            try:
                return int(text)
            except ValueError:  # "7.0" written by pandas for an int column with gaps
                value = float(text)
                if not value.is_integer():
                    raise
                return int(value)
        return float(text)
    except ValueError as err:
        raise ValueError(f"{where}: cannot read {text!r} as {kind.__name__}") from err


def _pick(row: dict[str, str], key: str, kind: type, where: str):
    """The first non-empty column among the aliases of `key`, as a number (None if all are absent or empty)."""
    name = next((c for c in _ALIASES[key] if row.get(c) not in (None, "")), None)
    return _number(row[name], kind, f"{where} column {name}") if name else None


def read_i2p(path: str | Path, category: str | None = None) -> list[I2PPrompt]:
    """All rows of an I2P-format CSV, optionally only those whose `categories` include `category`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"I2P prompt file not found: {path}")
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        if "prompt" not in columns:
            found = ", ".join(columns) if columns else "none (empty file)"
            raise ValueError(f"{path}: an I2P file needs a 'prompt' column; columns found: {found}")
        rows = list(reader)
    if not rows:
        raise ValueError(f"{path}: header only, no prompts")
    used = {"prompt", "categories"} | {c for names in _ALIASES.values() for c in names}
    records = []
    for i, row in enumerate(rows):
        where = f"{path} row {i + 2}"  # 1-based, after the header line
        cats = tuple(c.strip() for c in (row.get("categories") or "").split(",") if c.strip())
        if category is not None and category not in cats:
            continue
        index = _pick(row, "index", int, where)
        records.append(I2PPrompt(
            prompt=(row["prompt"] or "").strip(), index=i if index is None else index,
            seed=_pick(row, "seed", int, where), guidance_scale=_pick(row, "guidance_scale", float, where),
            width=_pick(row, "width", int, where), height=_pick(row, "height", int, where), categories=cats,
            extra={k: v for k, v in row.items() if k not in used and k is not None},
        ))
    return records
