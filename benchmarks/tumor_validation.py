"""Tumour score validation on MEASURED expression of the labelled HER2ST sections.

Reads the sections of ``benchmarks/data/her2st_labelled.yaml`` (B1, C1, D1, E1, F1, G2, H1:
counts + spots + pathologist labels, no images) with the ``st`` readers, scores every candidate
gene set of :data:`napari_stpredict.tumor.CANDIDATE_GENE_SETS` (log1p-CPM expression, z-scores
against the pooled spots of all sections — the role a model's training statistics play), and
reports AUROC, average precision and F1 at the Otsu threshold against the labels
(``invasive cancer`` + ``cancer in situ`` = tumour, ``undetermined`` left out).

The default signature (``napari_stpredict.st.genesets.DEFAULT_TUMOR_GENES``) is chosen without
looking at the sections it is scored on: the candidate with the best mean AUROC on the
*selection* sections B1, C1, D1 (patients B and C also give the imaged training sections of
``her2st.yaml``) is the default, and its AUROC is reported on the *held-out* sections E1, F1,
G2, H1, which took no part in the choice. The script checks that the rule still picks the
default fixed in code. It also runs leave-one-section-out selection (best candidate on six
sections, scored on the seventh) to show how much choosing by data is worth.

    /work/venv/bin/python benchmarks/tumor_validation.py [--manifest M] [--json OUT]
                                                         [--write-docs docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_MANIFEST = HERE / "data" / "her2st_labelled.yaml"
SELECTION = ("B1", "C1", "D1")  # choose the default here …
HELD_OUT = ("E1", "F1", "G2", "H1")  # … and report it here


def _default_name() -> str:
    """The candidate whose genes are the default signature fixed in code."""
    from napari_stpredict.tumor import CANDIDATE_GENE_SETS, DEFAULT_TUMOR_GENES

    for name, spec in CANDIDATE_GENE_SETS.items():
        if tuple(spec["genes"]) == tuple(DEFAULT_TUMOR_GENES):
            return name
    raise SystemExit("tumor_validation: the default signature is not among the candidates")


DEFAULT_NAME = _default_name()


def select_default(rows: list[dict], sections=SELECTION) -> tuple[str, dict[str, float]]:
    """The candidate with the best mean AUROC on ``sections`` (ties: fewer genes, then name)."""
    sets = list(dict.fromkeys(r["gene_set"] for r in rows))
    means = {g: float(np.nanmean([_auroc(rows, g, s) for s in sections])) for g in sets}
    n_genes = {r["gene_set"]: len(r["genes"].split(",")) for r in rows}
    best = max(sets, key=lambda g: (round(means[g], 6), -n_genes[g], g))
    return best, means


def run(manifest: Path) -> dict:
    """Read the sections and validate every candidate; return the rows and summaries."""
    from napari_stpredict.st import read_sections
    from napari_stpredict.tumor import CANDIDATE_GENE_SETS, validate_gene_sets

    t0 = time.perf_counter()
    adatas = read_sections(manifest)
    t_read = time.perf_counter() - t0
    sections = [str(a.obs["section"].iloc[0]) for a in adatas]
    rows = validate_gene_sets(dict(zip(sections, adatas, strict=True)), CANDIDATE_GENE_SETS)
    t_all = time.perf_counter() - t0
    labels = {}
    for s, a in zip(sections, adatas, strict=True):
        labels[s] = {str(k): int(v) for k, v in a.obs["label"].value_counts(dropna=False).items()}
    # the choice sees the selection sections only: their AUROCs, and z-scores pooled over them
    chosen = {s: a for s, a in zip(sections, adatas, strict=True) if s in SELECTION}
    selected, selection_means = select_default(validate_gene_sets(chosen, CANDIDATE_GENE_SETS))
    return {
        "manifest": str(manifest),
        "selection_sections": list(SELECTION),
        "held_out_sections": list(HELD_OUT),
        "selected": selected,
        "selection_means": selection_means,
        "default": DEFAULT_NAME,
        "sections": sections,
        "labels": labels,
        "rows": rows,
        "loso": loso_selection(rows, sections),
        "seconds": {"read": round(t_read, 2), "total": round(t_all, 2)},
        "python": platform.python_version(),
    }


def _auroc(rows: list[dict], gene_set: str, section: str) -> float:
    for r in rows:
        if r["gene_set"] == gene_set and r["section"] == section:
            return float(r["auroc"])
    return float("nan")


def loso_selection(rows: list[dict], sections: list[str]) -> list[dict]:
    """Pick the best candidate on six sections, score it on the seventh."""
    sets = list(dict.fromkeys(r["gene_set"] for r in rows))
    out = []
    for held in sections:
        train = [s for s in sections if s != held]
        means = {g: np.nanmean([_auroc(rows, g, s) for s in train]) for g in sets}
        best = max(means, key=means.get)
        out.append(
            {
                "held_out": held,
                "selected": best,
                "auroc_selected": _auroc(rows, best, held),
                "auroc_default": _auroc(rows, DEFAULT_NAME, held),
            }
        )
    return out


def markdown(result: dict, command: str) -> str:
    """The docs/benchmarks.md section body."""
    rows, secs = result["rows"], result["sections"]
    sel, held = result["selection_sections"], result["held_out_sections"]
    sets = list(dict.fromkeys(r["gene_set"] for r in rows))
    by = {(r["gene_set"], r["section"]): r for r in rows}

    def f(v: float | None) -> str:
        return "–" if v is None or not np.isfinite(v) else f"{v:.3f}"

    def mean_over(g: str, ss) -> float:
        return float(np.nanmean([_auroc(rows, g, s) for s in ss]))

    def sd_over(g: str, ss) -> float:
        return float(np.nanstd([_auroc(rows, g, s) for s in ss]))

    default = result["default"]
    lines = [
        "## Tumour localization on measured expression (labelled HER2ST sections)",
        "",
        f"Command: `{command}`  ",
        f"Data: {', '.join(secs)} (../shared/data/her2st, manifest "
        "`benchmarks/data/her2st_labelled.yaml`); measured counts → log1p-CPM (10⁴); score = mean "
        "z-score of the gene set, z-scored against all spots of the seven sections pooled (the role "
        "of a model's training statistics). Tumour = `invasive cancer` + `cancer in situ`; "
        "`undetermined` spots are left out; every other label is non-tumour. F1 at the Otsu "
        "threshold of the scores (the widget's *auto*). Candidates are fixed in "
        "`napari_stpredict.tumor.CANDIDATE_GENE_SETS`, each with a biological rationale; all are "
        f"reported. Run time {result['seconds']['total']:.0f} s on the 2-core CPU "
        f"(reading the sections {result['seconds']['read']:.0f} s; load average "
        f"{result.get('load', '?')}).",
        "",
        f"**How the default is chosen.** The default signature is the candidate with the best mean "
        f"AUROC on the *selection* sections {', '.join(sel)} only (z-scores pooled over those three "
        f"sections alone; column *selection mean*); it is reported on the *held-out* sections "
        f"{', '.join(held)}, which took no part in the choice. The rule picks "
        f"`{result['selected']}`"
        + (
            " — the default fixed in `napari_stpredict.st.genesets.DEFAULT_TUMOR_GENES`."
            if result["selected"] == default
            else f", but the code's default is `{default}`: update the code or this table."
        ),
        "",
        "Spots per section (tumour / labelled, undetermined left out): "
        + ", ".join(
            f"{s} {by[(sets[0], s)]['n_tumor']}/{by[(sets[0], s)]['n']}"
            for s in secs
            if (sets[0], s) in by
        )
        + ".",
        "",
        "**AUROC per section** (selection sections marked *)",
        "",
        "| gene set | "
        + " | ".join(f"{s}*" if s in sel else s for s in secs)
        + f" | selection mean ({', '.join(sel)}) | **held-out mean ± sd ({', '.join(held)})** "
        "| all 7 pooled |",
        "|---|" + "---:|" * (len(secs) + 3),
    ]
    for g in sets:
        cells = [f(by[(g, s)]["auroc"]) if (g, s) in by else "–" for s in secs]
        name = f"**{g}** (default)" if g == default else g
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {f(result['selection_means'].get(g))} | "
            f"{f(mean_over(g, held))} ± {f(sd_over(g, held))} | "
            f"{f(by.get((g, 'pooled'), {}).get('auroc'))} |"
        )
    lines += [
        "",
        "**Average precision and F1 (Otsu), mean over the held-out sections**",
        "",
        "| gene set | AP | F1 |",
        "|---|---:|---:|",
    ]
    for g in sets:
        ap = np.nanmean([by[(g, s)]["average_precision"] for s in held if (g, s) in by])
        f1 = np.nanmean([by[(g, s)]["f1"] for s in held if (g, s) in by])
        lines.append(f"| {g} | {f(ap)} | {f(f1)} |")
    loso = result["loso"]
    sel_auc = np.mean([r["auroc_selected"] for r in loso])
    dflt = np.mean([r["auroc_default"] for r in loso])
    d_ho = mean_over(default, held)
    best_ho = max(sets, key=lambda g: mean_over(g, held))
    lines += [
        "",
        "**Leave-one-section-out selection** (best mean AUROC on six sections, scored on the "
        f"seventh): mean held-out AUROC {sel_auc:.3f} for the data-selected set versus {dflt:.3f} "
        "for the default; selected: "
        + ", ".join(f"{r['held_out']} → {r['selected'].split(' (')[0]}" for r in loso)
        + ".",
        "",
        f"**Reading.** On the held-out sections the default reaches a mean AUROC of {d_ho:.3f}. "
        f"The best candidate *on the held-out sections* is `{best_ho}` "
        f"({mean_over(best_ho, held):.3f}); knowing that would mean choosing on the sections we "
        "report, which is exactly what the split forbids. All seven sections are HER2-positive: "
        "ERBB2 and its amplicon carry no signal in HER2-negative tumours, where the epithelial "
        "genes of the default (KRT8/18/19, EPCAM, CDH1) carry the score; these numbers cannot "
        "show that case.",
    ]
    return "\n".join(lines)


def write_docs(path: Path, body: str, *, name: str = "tumor") -> None:
    """Replace the inside of ``<!-- section:NAME -->`` … ``<!-- /section:NAME -->``."""
    text = path.read_text(encoding="utf-8")
    start, end = f"<!-- section:{name} -->", f"<!-- /section:{name} -->"
    a, b = text.index(start) + len(start), text.index(end)
    inside = text[a:b]
    # keep the speed table written by bench_tumor_export.py
    keep = ""
    if "<!-- tumor-speed -->" in inside:
        keep = inside[inside.index("<!-- tumor-speed -->") : inside.index("<!-- /tumor-speed -->")]
        keep = "\n" + keep + "<!-- /tumor-speed -->\n"
    path.write_text(text[:a] + "\n" + body.strip() + "\n" + keep + text[b:], encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST)
    ap.add_argument("--json", type=Path, default=None, help="write all rows as JSON")
    ap.add_argument(
        "--write-docs", type=Path, default=None, help="update the tumor section of this file"
    )
    args = ap.parse_args(argv)
    if not args.manifest.exists():
        print(f"tumor_validation: manifest {args.manifest} not found", file=sys.stderr)
        return 2
    result = run(args.manifest)
    result["load"] = f"{os.getloadavg()[0]:.1f}"
    if result["selected"] != DEFAULT_NAME:
        print(
            f"tumor_validation: the selection rule picks {result['selected']!r}, the code's "
            f"default is {DEFAULT_NAME!r}",
            file=sys.stderr,
        )
    command = (
        "OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/tumor_validation.py "
        "--write-docs docs/benchmarks.md"
    )
    body = markdown(result, command)
    print(body)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, default=float))
    if args.write_docs:
        write_docs(args.write_docs, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
