"""What a loaded dataset manifest is: :class:`Manifest` and its :class:`SectionSpec` sections.

Frozen, validated values (paths resolved against the manifest's folder); built by
:func:`napari_stpredict.st.manifest.load_manifest`, which also re-exports every name here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from napari_stpredict.errors import DatasetError

SectionKind = Literal["table", "visium", "h5ad", "spatialdata", "visium_hd", "xenium"]
#: data-source keys of a section, one per kind (the "table" kind's key is ``counts``)
SOURCE_KEYS = ("counts", "visium", "h5ad", "spatialdata", "visium_hd", "xenium")

#: Named scales for Space Ranger / squidpy coordinates (resolved from the scale factors).
NAMED_SCALES = ("fullres", "hires", "lowres")
#: keys of a section's ``elements:`` mapping (SpatialData element names)
ELEMENT_KEYS = ("table", "image", "shapes", "coordinate_system")


@dataclass(frozen=True)
class CoordinateTable:
    """A second table that overrides the spot pixel coordinates (e.g. a registered image).

    Spots of the section are matched to this table's rows with ``spot_id`` (a template over
    this table's own columns); spots missing from it are dropped.
    """

    table: Path
    spot_id: str = "{x}x{y}"
    pixel_columns: tuple[str, str] = ("pixel_x", "pixel_y")
    scale: float = 1.0


@dataclass(frozen=True)
class SpatialDataElements:
    """Element names inside a SpatialData store (``None`` = the only one of its kind)."""

    table: str | None = None
    image: str | None = None
    shapes: str | None = None
    coordinate_system: str | None = None


@dataclass(frozen=True)
class SectionSpec:
    """One section of a dataset manifest, with paths resolved and values validated.

    Attributes
    ----------
    name, patient
        Section name (unique in the manifest) and patient/donor (defaults to ``name``); cross
        validation never splits a patient across folds.
    kind
        ``"table"`` (counts + spots tables: legacy ST and anything tabular), ``"visium"``
        (Space Ranger ``outs``) or ``"h5ad"``.
    image
        The H&E image whose pixels the spot coordinates refer to (after ``scale``); ``None``
        for sections used on measured expression only.
    manifest
        The manifest file this section came from (for error messages).
    """

    name: str
    kind: SectionKind
    manifest: Path
    patient: str = ""
    image: Path | None = None
    # table sections
    counts: Path | None = None
    spots: Path | None = None
    spot_id: str = "{x}x{y}"
    pixel_columns: tuple[str, str] = ("pixel_x", "pixel_y")
    selected_column: str | None = None
    transpose: bool = False
    coordinates: CoordinateTable | None = None
    # visium / h5ad sections
    visium: Path | None = None
    h5ad: Path | None = None
    layer: str | None = None
    spatial_key: str = "spatial"
    gene_column: str | None = None
    # spatialdata / visium_hd / xenium sections (st/spatialdata.py)
    spatialdata: Path | None = None
    visium_hd: Path | None = None
    xenium: Path | None = None
    elements: SpatialDataElements | None = None
    bin_size: int | None = None
    # all kinds
    scale: float | str | None = None
    labels: Path | None = None
    label_column: str = "label"
    labels_spot_id: str | None = None
    mpp: float | None = None
    spot_pitch_um: float | None = None
    spot_diameter_um: float | None = None

    @property
    def where(self) -> str:
        """``"MANIFEST: section 'NAME'"`` — the prefix of every error about this section."""
        return f"{self.manifest}: section {self.name!r}"

    @property
    def source(self) -> Path:
        """The main data file or folder (counts table, Space Ranger folder or .h5ad)."""
        src = {
            "table": self.counts,
            "visium": self.visium,
            "h5ad": self.h5ad,
            "spatialdata": self.spatialdata,
            "visium_hd": self.visium_hd,
            "xenium": self.xenium,
        }[self.kind]
        assert src is not None
        return src

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable description (paths as strings), e.g. for model metadata."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Path):
                v = str(v)
            elif isinstance(v, CoordinateTable):
                v = {
                    "table": str(v.table),
                    "spot_id": v.spot_id,
                    "pixel_columns": list(v.pixel_columns),
                    "scale": v.scale,
                }
            elif isinstance(v, SpatialDataElements):
                v = {k: getattr(v, k) for k in ELEMENT_KEYS}
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out


@dataclass(frozen=True)
class Manifest:
    """A validated dataset manifest.

    Attributes
    ----------
    path : pathlib.Path
        The manifest file.
    name : str
        Dataset name (``name:`` in the file, else the file stem).
    sections : list of SectionSpec
        The sections in file order.
    genes : pathlib.Path or None
        Optional gene list file named by the manifest (``genes:``), resolved.
    description : str
        Free text (``description:``), empty when not given.
    """

    path: Path
    name: str
    sections: list[SectionSpec] = field(default_factory=list)
    genes: Path | None = None
    description: str = ""

    @property
    def names(self) -> list[str]:
        """Section names in file order."""
        return [s.name for s in self.sections]

    def section(self, name: str) -> SectionSpec:
        """The section called ``name``.

        Raises
        ------
        DatasetError
            If there is no such section.
        """
        for s in self.sections:
            if s.name == name:
                return s
        raise DatasetError(f"{self.path}: no section {name!r} (sections: {', '.join(self.names)})")

    def select(self, names: list[str] | None) -> list[SectionSpec]:
        """The sections named in ``names`` (all when ``None``), in the order given."""
        if names is None:
            return list(self.sections)
        return [self.section(n) for n in names]

    def patients(self) -> dict[str, list[str]]:
        """Patient → section names, in file order."""
        out: dict[str, list[str]] = {}
        for s in self.sections:
            out.setdefault(s.patient, []).append(s.name)
        return out
