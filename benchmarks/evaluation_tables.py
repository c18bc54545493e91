"""Render the Markdown tables of docs/benchmarks.md (section "evaluation") from result JSONs.

    python benchmarks/evaluation_tables.py docs/results/her2st_loso.json [more.json ...]
    python benchmarks/evaluation_tables.py docs/results/study_her2st_loso.json   # a study

Prints one table per file: the methods side by side, mean ± sd over folds. Several
``stpredict evaluate`` JSONs of one method each (benchmarks/gpu_checks.sh) can be merged with
``--merge a.json,b.json``. A ``benchmarks/study_accuracy.py`` JSON gives one row per method ×
TTA × context arm.
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


def study_table(
    path: str, keys=("pcc_heg", "pcc_hvg", "pcc_mg", "pcc_all", "gene_gene_corr")
) -> str:
    """One row per (method, TTA, context) arm of a study JSON, per cross-validation."""
    d = json.loads(Path(path).read_text())
    labels = dict(ROWS)
    out = []
    by_cv: dict[str, list[tuple[str, dict]]] = {}
    for label, run in d["runs"].items():
        cv, method, tta, ctx = label.split("|")
        by_cv.setdefault(cv, []).append((f"{method} | {tta[3:]} | {ctx[3:]}", run))
    for cv, rows in by_cv.items():
        out.append(f"*{cv}*")
        out.append("")
        out.append("| method | TTA | context | " + " | ".join(labels[k] for k in keys) + " |")
        out.append("|---|---:|---:|" + "---:|" * len(keys))
        for name, run in rows:
            for which in ("default", "tuned"):
                summ = run["summary"].get(which)
                if summ is None:
                    continue
                tag = (
                    name if which == "default" else name.replace(" |", " (k, weighting tuned) |", 1)
                )
                cells = [_fmt(*summ[k]) if k in summ else "–" for k in keys]
                out.append(f"| {tag} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def merge(paths: list[str]) -> dict:
    """One result dict from several single-method ``stpredict evaluate`` JSONs."""
    merged: dict = {"methods": {}}
    for p in paths:
        d = json.loads(Path(p).read_text())
        merged["methods"].update(d["methods"])
    return merged


if __name__ == "__main__":
    args = sys.argv[1:]
    if args and args[0] == "--merge":
        tmp = Path("/tmp/_merged_eval.json")
        tmp.write_text(json.dumps(merge(args[1].split(","))))
        args = [str(tmp), *args[2:]]
    for p in args:
        print(f"<!-- {p} -->")
        d = json.loads(Path(p).read_text())
        print(study_table(p) if "runs" in d else table(p))
        print()
