"""Markdown report with matplotlib figures (PNG) for an :class:`EvaluationResult`.

Figures: the per-gene PCC distribution of each method (all genes, HEG, HVG, MG), predicted vs
measured scatter plots of the top genes, and spatial maps of measured vs predicted expression
for a few markers on held-out sections.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import matplotlib
import numpy as np

from napari_stpredict.evaluation.markers import match_genes
from napari_stpredict.evaluation.results import (
    METRIC_KEYS,
    OPTIONAL_KEYS,
    EvaluationResult,
    SectionPrediction,
)
from napari_stpredict.io_utils import atomic_path

__all__ = ["format_value", "write_report"]

_LABELS = {
    "pcc_heg": "PCC HEG",
    "pcc_hvg": "PCC HVG",
    "pcc_mg": "PCC MG",
    "pcc_all": "PCC all",
    "mse": "MSE",
    "mae": "MAE",
    "gene_gene_corr": "gene–gene r",
    "tumor_auroc": "tumour AUROC (pred)",
    "tumor_auroc_measured": "tumour AUROC (measured)",
}


def format_value(mean: float | None, sd: float | None = None, *, digits: int = 3) -> str:
    """``"0.123 ± 0.045"``; ``"–"`` for a missing or NaN value."""
    if mean is None or not np.isfinite(mean):
        return "–"
    if sd is None or not np.isfinite(sd):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def _sections_by_method(result: EvaluationResult) -> dict[str, list[SectionPrediction]]:
    return {
        name: [s for f in m.folds if f.ok for s in f.sections] for name, m in result.methods.items()
    }


def _plot_pcc_distribution(result: EvaluationResult, path: Path) -> None:
    per_method = _sections_by_method(result)
    names = [n for n, secs in per_method.items() if secs]
    sets = [("all genes", None), ("HEG", "heg"), ("HVG", "hvg"), ("MG", "mg")]
    fig = _figure((3.2 * len(sets), 3.4))
    axes = fig.subplots(1, len(sets), sharey=True)
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, attr) in zip(axes, sets, strict=True):
        data = []
        for n in names:
            vals = [s.pcc if attr is None else s.pcc[getattr(s, attr)] for s in per_method[n]]
            data.append(np.concatenate(vals) if vals else np.array([]))
        pos = np.arange(len(names))
        nonempty = [i for i, d in enumerate(data) if d.size]
        if nonempty:
            parts = ax.violinplot(
                [data[i] for i in nonempty], positions=pos[nonempty], showmedians=True
            )
            for j, body in enumerate(parts["bodies"]):
                body.set_facecolor(colors[nonempty[j] % len(colors)])
                body.set_alpha(0.6)
            for i in nonempty:
                ax.scatter([i], [data[i].mean()], marker="D", color="k", s=14, zorder=3)
        ax.axhline(0, color="0.6", lw=0.8)
        ax.set_xticks(pos, names)
        ax.set_title(title)
    axes[0].set_ylabel("per-gene PCC (held-out sections)")
    fig.suptitle("Per-gene PCC; ◆ = mean", fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def _pick_section(result: EvaluationResult, section: str | None) -> str | None:
    per_method = _sections_by_method(result)
    names = [s.section for secs in per_method.values() for s in secs]
    if not names:
        return None
    if section is not None and section in names:
        return section
    # the section that every method scored, first in fold order
    common = [
        n
        for n in dict.fromkeys(names)
        if all(any(s.section == n for s in v) for v in per_method.values() if v)
    ]
    return common[0] if common else names[0]


def _section_of(result: EvaluationResult, section: str) -> dict[str, SectionPrediction]:
    out = {}
    for name, secs in _sections_by_method(result).items():
        for s in secs:
            if s.section == section:
                out[name] = s
                break
    return out


def _plot_scatter(
    preds: dict[str, SectionPrediction], path: Path, *, n_genes: int = 4
) -> list[str]:
    first = next(iter(preds.values()))
    # the top genes: highest total measured expression on the section
    order = np.argsort(-first.true.sum(axis=0), kind="stable")[:n_genes]
    methods = list(preds)
    fig = _figure((2.6 * len(methods), 2.4 * len(order)))
    axes = fig.subplots(len(order), len(methods), squeeze=False)
    for r, gi in enumerate(order):
        for c, m in enumerate(methods):
            s = preds[m]
            ax = axes[r, c]
            ax.scatter(s.true[:, gi], s.pred[:, gi], s=4, alpha=0.5)
            lo = float(min(s.true[:, gi].min(), s.pred[:, gi].min()))
            hi = float(max(s.true[:, gi].max(), s.pred[:, gi].max()))
            ax.plot([lo, hi], [lo, hi], color="0.6", lw=0.8)
            ax.set_title(f"{m}: {s.genes[gi]} (r={s.pcc[gi]:.2f})", fontsize=8)
            if c == 0:
                ax.set_ylabel("predicted")
            if r == len(order) - 1:
                ax.set_xlabel("measured")
    fig.suptitle(f"Section {first.section}: top genes by expression", fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    return [first.genes[i] for i in order]


def _plot_spatial(
    preds: dict[str, SectionPrediction], markers: list[str], path: Path, *, n_genes: int = 4
) -> list[str]:
    first = next(iter(preds.values()))
    idx, _ = match_genes(first.genes, markers)
    if not idx:
        idx = list(first.hvg)
    # the markers that vary most on this section: the most informative maps
    idx = sorted(idx, key=lambda i: -float(first.true[:, i].var()))[:n_genes]
    cols = ["measured", *preds]
    fig = _figure((2.5 * len(cols), 2.5 * len(idx)))
    axes = fig.subplots(len(idx), len(cols), squeeze=False)
    xy = first.xy
    # spot size: about the grid pitch in points, so maps look like tissue at any section size
    span = float(np.ptp(xy, axis=0).max()) if len(xy) > 1 else 1.0
    size = _spot_size(xy, span, axis_pt=2.5 * 72 * 0.8)
    for r, gi in enumerate(idx):
        for c, col in enumerate(cols):
            ax = axes[r, c]
            if col == "measured":
                v, title = first.true[:, gi], f"{first.genes[gi]} measured"
            else:
                v = preds[col].pred[:, gi]
                title = f"{col} (r={preds[col].pcc[gi]:.2f})"
            # each map on its own 1–99 % range: PCC is scale-free, and retrieval averages shrink
            # predictions towards the mean, which a shared scale would show as a flat map
            vmin, vmax = np.percentile(v, [1, 99]) if v.size else (0.0, 1.0)
            if vmax <= vmin:
                vmax = vmin + 1e-6
            ax.scatter(
                xy[:, 0], xy[:, 1], c=v, s=size, cmap="magma", vmin=vmin, vmax=vmax, linewidths=0
            )
            ax.set_xlim(xy[:, 0].min() - 0.03 * span, xy[:, 0].max() + 0.03 * span)
            ax.set_aspect("equal")
            ax.invert_yaxis()
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(title, fontsize=8)
    fig.suptitle(
        f"Section {first.section}: measured vs predicted (each map scaled to its 1–99 %)",
        fontsize=10,
    )
    fig.tight_layout()
    _save(fig, path)
    return [first.genes[i] for i in idx]


def _spot_size(xy: np.ndarray, span: float, *, axis_pt: float) -> float:
    """Marker area (pt²) for spots drawn about 80 % of their centre-to-centre pitch wide."""
    if len(xy) < 2 or span <= 0:
        return 20.0
    from scipy.spatial import cKDTree

    d, _ = cKDTree(xy).query(xy, k=2)
    pitch = float(np.median(d[:, 1]))
    diameter = 0.8 * axis_pt * pitch / (1.06 * span)
    return float(np.clip(diameter, 1.0, 20.0) ** 2)


def _figure(size: tuple[float, float]):
    # a bare Figure (no pyplot): no GUI backend is touched, safe inside napari or a thread
    from matplotlib.figure import Figure

    return Figure(figsize=size)


def _save(fig, path: Path) -> None:
    import io

    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, dpi=72, format="png")
    buf.seek(0)
    # a 256-colour palette: plots stay sharp and the files small enough to keep in a repository
    img = Image.open(buf).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG", optimize=True)


def _write_pcc_csv(result: EvaluationResult, path: Path) -> None:
    """One row per gene: its mean PCC per method over the held-out sections, and how often it
    was a HEG / HVG there (small enough to keep next to the report)."""
    per_method = _sections_by_method(result)
    genes: list[str] = list(
        dict.fromkeys(g for secs in per_method.values() for s in secs for g in s.genes)
    )
    names = [n for n, secs in per_method.items() if secs]
    sums = {n: dict.fromkeys(genes, 0.0) for n in names}
    counts = {n: dict.fromkeys(genes, 0) for n in names}
    heg = dict.fromkeys(genes, 0)
    hvg = dict.fromkeys(genes, 0)
    mg: set[str] = set()
    for n in names:
        for s in per_method[n]:
            for i, g in enumerate(s.genes):
                sums[n][g] += float(s.pcc[i])
                counts[n][g] += 1
    # HEG/HVG/MG sets depend on the measured expression only: count them on one method
    for s in per_method[names[0]] if names else []:
        for i in s.heg:
            heg[s.genes[i]] += 1
        for i in s.hvg:
            hvg[s.genes[i]] += 1
        mg.update(s.genes[i] for i in s.mg)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["gene", *[f"pcc_{n}" for n in names], "n_sections", "heg", "hvg", "marker"])
        for g in genes:
            vals = [f"{sums[n][g] / counts[n][g]:.4f}" if counts[n][g] else "" for n in names]
            w.writerow([g, *vals, max(counts[n][g] for n in names), heg[g], hvg[g], int(g in mg)])


def _markdown(result: EvaluationResult, figures: dict[str, str], notes: list[str]) -> str:
    methods = result.methods
    keys = list(METRIC_KEYS) + [
        k for k in OPTIONAL_KEYS if any(k in m.metric_keys() for m in methods.values())
    ]
    cfg = result.config
    lines = ["# Evaluation report", ""]
    cv = cfg.get("cv", "–")
    lines += [
        f"- Manifest: `{cfg.get('manifest', '–')}`",
        f"- Protocol: {cv}; HEG/HVG = top {cfg.get('n_top', 50)} genes of each held-out section; "
        f"{len(result.genes)} genes",
        f"- Markers (MG): {len(result.markers_used)} used"
        + (f", {len(result.markers_missing)} not in the panel" if result.markers_missing else ""),
        f"- Wall time: {result.wall_time_s:.0f} s",
        "",
        "## Mean ± sd over folds",
        "",
        "| method | " + " | ".join(_LABELS[k] for k in keys) + " | failed folds |",
        "|---" * (len(keys) + 2) + "|",
    ]
    for name, m in methods.items():
        mean, sd = m.mean(), m.sd()
        row = [format_value(mean.get(k), sd.get(k)) for k in keys]
        lines.append(f"| {name} | " + " | ".join(row) + f" | {sum(not f.ok for f in m.folds)} |")
    lines += ["", "## Per fold", ""]
    lines.append("| method | test | " + " | ".join(_LABELS[k] for k in keys) + " |")
    lines.append("|---" * (len(keys) + 2) + "|")
    for name, m in methods.items():
        for f in m.folds:
            test = ", ".join(f.test)
            if not f.ok:
                lines.append(f"| {name} | {test} | failed: {f.error} |" + " |" * (len(keys) - 1))
                continue
            lines.append(
                f"| {name} | {test} | "
                + " | ".join(format_value(f.metrics.get(k)) for k in keys)
                + " |"
            )
    if figures:
        lines += ["", "## Figures", ""]
        for title, fname in figures.items():
            lines += [f"### {title}", "", f"![{title}]({fname})", ""]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    lines += ["## Configuration", "", "```"]
    lines += [f"{k}: {v}" for k, v in cfg.items()]
    lines += [
        "```",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in result.versions.items()),
        "",
    ]
    return "\n".join(lines)


def write_report(
    result: EvaluationResult,
    out_dir: str | os.PathLike,
    *,
    section: str | None = None,
    max_sections: int = 2,
) -> Path:
    """Write ``report.md``, ``per_gene_pcc.csv`` and the PNG figures into ``out_dir``.

    Parameters
    ----------
    result
        An evaluation with its per-section predictions (as returned by ``evaluate``).
    out_dir
        Folder, created if needed; files in it are replaced.
    section
        Held-out section for the scatter and spatial figures (default: the first scored).
    max_sections
        Spatial maps are drawn for up to this many held-out sections.

    Returns
    -------
    Path
        The Markdown file.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures: dict[str, str] = {}
    notes: list[str] = []
    if any(secs for secs in _sections_by_method(result).values()):
        _plot_pcc_distribution(result, out / "pcc_distribution.png")
        figures["Per-gene PCC distribution"] = "pcc_distribution.png"
        first = _pick_section(result, section)
        if first is not None:
            preds = _section_of(result, first)
            genes = _plot_scatter(preds, out / f"scatter_{first}.png")
            figures[f"Predicted vs measured, top genes, section {first}"] = f"scatter_{first}.png"
            notes.append(f"Scatter genes (highest total expression on {first}): {', '.join(genes)}")
        all_secs = list(
            dict.fromkeys(s.section for secs in _sections_by_method(result).values() for s in secs)
        )
        if first in all_secs:
            all_secs.remove(first)
            all_secs.insert(0, first)
        markers = result.markers_used or []
        for sec in all_secs[:max_sections]:
            preds = _section_of(result, sec)
            genes = _plot_spatial(preds, markers, out / f"spatial_{sec}.png")
            figures[f"Spatial maps, section {sec} ({', '.join(genes)})"] = f"spatial_{sec}.png"
        _write_pcc_csv(result, out / "per_gene_pcc.csv")
        notes.append(
            "Per-gene PCC of every method and section: [per_gene_pcc.csv](per_gene_pcc.csv)"
        )
    if result.markers_missing:
        notes.append(
            "Markers not in the gene panel (skipped): " + ", ".join(result.markers_missing)
        )
    failed = [(n, f) for n, m in result.methods.items() for f in m.folds if not f.ok]
    for n, f in failed:
        notes.append(f"{n} fold {'+'.join(f.test)} failed: {f.error}")
    md = out / "report.md"
    with atomic_path(md) as tmp:
        tmp.write_text(_markdown(result, figures, notes), encoding="utf-8")
    return md
