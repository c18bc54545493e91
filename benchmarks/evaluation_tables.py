"""Render the Markdown tables of docs/benchmarks.md (section "evaluation") from result JSONs.

    python benchmarks/evaluation_tables.py docs/results/her2st_loso.json [more.json ...]

Prints one table per file: the three methods side by side, mean ± sd over folds.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROWS = [
    ("pcc_heg", "PCC HEG@50"),
    ("pcc_hvg", "PCC HVG@50"),
    ("pcc_mg", "PCC MG"),
    ("pcc_all", "PCC all genes"),
    ("gene_gene_corr", "gene–gene corr. (HVG)"),
    ("mse", "MSE"),
    ("mae", "MAE"),
]


def _fmt(mean, sd) -> str:
    if mean is None:
        return "–"
    return f"{mean:.3f} ± {sd:.3f}" if sd is not None else f"{mean:.3f}"


def table(path: str) -> str:
    d = json.loads(Path(path).read_text())
    methods = list(d["methods"])
    lines = [
        f"| metric | {' | '.join(methods)} |",
        "|---|" + "---:|" * len(methods),
    ]
    for key, label in ROWS:
        best = None
        vals = [d["methods"][m]["mean"].get(key) for m in methods]
        finite = [v for v in vals if v is not None]
        if finite:
            best = min(finite) if key in ("mse", "mae") else max(finite)
        cells = []
        for m, v in zip(methods, vals, strict=True):
            cell = _fmt(v, d["methods"][m]["sd"].get(key))
            cells.append(f"**{cell}**" if v is not None and v == best else cell)
        lines.append(f"| {label} | {' | '.join(cells)} |")
    folds = [f"{m['n_folds'] - m['n_failed']}/{m['n_folds']}" for m in d["methods"].values()]
    lines.append(f"| folds ok | {' | '.join(folds)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    for p in sys.argv[1:]:
        print(f"<!-- {p} -->")
        print(table(p))
        print()
