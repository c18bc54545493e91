"""Tissue detection validated against the spatial arrays' own "under tissue" flags.

For every section with an H&E image in ../shared/data (HER2ST B4, C2–C4; MOB1–3) the engine's
grid (``TileGrid`` at the default 112 µm patch and stride, cells kept by
``TileGrid.tissue_cells`` at the engine's default ``min_tissue`` 0.2) is compared with the
spots that the data's authors flagged as under tissue (``selected == 1``):

* **false tiles**: of the predicted (tissue) tiles whose centre lies inside the array's
  bounding box (all spots of the table, selected or not) grown by one pitch, the share whose
  centre is farther than one spot pitch from every under-tissue spot. Tiles outside the array
  frame are not counted: legacy ST arrays cover only part of the glass, so tissue there has no
  spot to confirm it. Target ≤ 5 %.
* **spot recall**: the share of under-tissue spots with a predicted tile centre within one
  pitch. Target ≥ 90 %.

Run: ``python benchmarks/tissue_validation.py [--markdown]``. Spot positions and the mpp come
from the manifests in benchmarks/data through the st readers (mpp from the spot grid).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
MANIFESTS = {"her2st": HERE / "data" / "her2st.yaml", "mob": HERE / "data" / "mob.yaml"}
SECTIONS = {"her2st": ["B4", "C2", "C3", "C4"], "mob": ["MOB1", "MOB2", "MOB3"]}
PATCH_UM = 112.0
PATCH_PX = 224
MIN_TISSUE = 0.2
MAX_FALSE = 0.05
MIN_RECALL = 0.90


@dataclass
class SectionResult:
    name: str
    mpp: float
    pitch_um: float
    n_tiles: int  # predicted (tissue) tiles
    n_tiles_in_frame: int
    n_false: int
    n_spots: int  # under-tissue spots
    n_found: int
    seconds: float

    @property
    def false_share(self) -> float:
        return self.n_false / self.n_tiles_in_frame if self.n_tiles_in_frame else 0.0

    @property
    def recall(self) -> float:
        return self.n_found / self.n_spots if self.n_spots else 1.0

    @property
    def ok(self) -> bool:
        return self.false_share <= MAX_FALSE and self.recall >= MIN_RECALL


def _all_spots_px(spec) -> np.ndarray:
    """``(n, 2)`` x, y pixel positions of every spot in the table (selected or not)."""
    import pandas as pd

    df = pd.read_csv(spec.spots, sep="\t")
    cx, cy = spec.pixel_columns
    return df[[cx, cy]].to_numpy(np.float64) * float(spec.scale or 1.0)


def validate_section(spec, **mask_kwargs) -> SectionResult:
    """Run the tissue detector on one manifest section and score it against its spots."""
    from scipy.spatial import cKDTree

    from napari_stpredict.inference.grid import TileGrid
    from napari_stpredict.slide import open_slide, tissue_mask
    from napari_stpredict.st import read_section

    adata = read_section(spec)
    info = adata.uns["stpredict"]
    mpp = float(info["mpp"])
    pitch_px = float(info["spot_pitch_px"])
    spots = np.asarray(adata.obsm["spatial"], np.float64)  # under-tissue spots, (x, y)
    everything = _all_spots_px(spec)
    t0 = time.perf_counter()
    with open_slide(spec.image, mpp=mpp) as slide:
        mask = tissue_mask(slide, **mask_kwargs)
        grid = TileGrid(slide.shape, mpp, patch_um=PATCH_UM, patch_px=PATCH_PX)
    seconds = time.perf_counter() - t0
    cells = np.argwhere(grid.tissue_cells(mask, MIN_TISSUE))
    centres = grid.cell_centers_px(cells)[:, ::-1]  # (x, y)
    lo = everything.min(axis=0) - pitch_px
    hi = everything.max(axis=0) + pitch_px
    in_frame = np.all((centres >= lo) & (centres <= hi), axis=1)
    d_tile, _ = cKDTree(spots).query(centres[in_frame]) if in_frame.any() else (np.empty(0), None)
    if len(centres):
        d_spot, _ = cKDTree(centres).query(spots)
    else:
        d_spot = np.full(len(spots), np.inf)
    return SectionResult(
        name=spec.name,
        mpp=mpp,
        pitch_um=pitch_px * mpp,
        n_tiles=len(centres),
        n_tiles_in_frame=int(in_frame.sum()),
        n_false=int((d_tile > pitch_px).sum()),
        n_spots=len(spots),
        n_found=int((d_spot <= pitch_px).sum()),
        seconds=seconds,
    )


def sections():
    """The manifest sections with an image, in benchmark order."""
    from napari_stpredict.st import load_manifest

    out = []
    for key, path in MANIFESTS.items():
        manifest = load_manifest(path)
        out.extend(manifest.section(n) for n in SECTIONS[key])
    return out


def markdown(results: list[SectionResult]) -> str:
    lines = [
        "| section | µm/px | pitch µm | tissue tiles (in frame) | far from spots | under-tissue spots | spots with a tile | pass |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.name} | {r.mpp:.3f} | {r.pitch_um:.0f} | {r.n_tiles} ({r.n_tiles_in_frame}) | "
            f"{r.n_false} = {100 * r.false_share:.1f} % | {r.n_spots} | "
            f"{r.n_found} = {100 * r.recall:.1f} % | {'yes' if r.ok else 'NO'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args(argv)
    results = []
    for spec in sections():
        r = validate_section(spec)
        results.append(r)
        if not args.markdown:
            print(
                f"{r.name:5s} mpp {r.mpp:.3f} tiles {r.n_tiles:4d} in-frame {r.n_tiles_in_frame:4d} "
                f"far {r.n_false:3d} ({100 * r.false_share:4.1f} %)  spots {r.n_spots:4d} "
                f"found {r.n_found:4d} ({100 * r.recall:5.1f} %)  mask {r.seconds:.2f} s "
                f"{'ok' if r.ok else 'FAIL'}",
                flush=True,
            )
    if args.markdown:
        print(markdown(results))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
