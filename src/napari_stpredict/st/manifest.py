"""The dataset manifest: a YAML file that lists spatial transcriptomics sections.

The schema is documented in ``docs/datasets.md``. Everything is validated when the manifest is
loaded (types, unknown keys, one data source per section, files present), so that a typo fails
in a second with one line naming the manifest, the section and the field, not an hour into
training.
"""

from __future__ import annotations

import difflib
import os
import string
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from napari_stpredict.errors import DatasetError

SectionKind = Literal["table", "visium", "h5ad", "spatialdata", "visium_hd", "xenium"]
#: data-source keys of a section, one per kind (the "table" kind's key is ``counts``)
SOURCE_KEYS = ("counts", "visium", "h5ad", "spatialdata", "visium_hd", "xenium")

#: Named scales for Space Ranger / squidpy coordinates (resolved from the scale factors).
NAMED_SCALES = ("fullres", "hires", "lowres")

_TOP_KEYS = {"name", "description", "defaults", "sections", "genes"}


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
                v = {k: getattr(v, k) for k in _ELEMENT_KEYS}
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out


@dataclass(frozen=True)
class Manifest:
    """A validated dataset manifest.

    Attributes
    ----------
    path
        The manifest file.
    name
        Dataset name (``name:`` in the file, else the file stem).
    sections
        The sections in file order.
    genes
        Optional gene list file named by the manifest (``genes:``), resolved.
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


# --------------------------------------------------------------------------------------------
# parsing


class _Ctx:
    """Where we are in the manifest, for one-line error messages."""

    def __init__(self, manifest: Path, section: str | None = None) -> None:
        self.manifest = manifest
        self.section = section

    def fail(self, fieldname: str | None, reason: str) -> DatasetError:
        where = str(self.manifest)
        if self.section is not None:
            where += f": section {self.section!r}"
        if fieldname:
            where += f": field {fieldname!r}"
        return DatasetError(f"{where}: {reason}")


_SECTION_KEYS = {f.name for f in fields(SectionSpec)} - {"kind", "manifest"}
_COORD_KEYS = {"table", "spot_id", "pixel_columns", "scale"}
_ELEMENT_KEYS = ("table", "image", "shapes", "coordinate_system")
_SPATIALDATA_KINDS = ("spatialdata", "visium_hd", "xenium")


def _suggest(key: str, allowed: set[str]) -> str:
    close = difflib.get_close_matches(key, sorted(allowed), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_keys(ctx: _Ctx, raw: dict, allowed: set[str], what: str) -> None:
    for key in raw:
        if key not in allowed:
            raise ctx.fail(str(key), f"unknown {what} key{_suggest(str(key), allowed)}")


def _str(ctx: _Ctx, raw: dict, key: str, default: str | None = None) -> str | None:
    v = raw.get(key, default)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, str | int | float):
        raise ctx.fail(key, f"expected a string, got {type(v).__name__}")
    v = str(v)
    if not v.strip():
        raise ctx.fail(key, "is empty")
    return v


def _positive(ctx: _Ctx, raw: dict, key: str) -> float | None:
    v = raw.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ctx.fail(key, f"expected a positive number, got {v!r}")
    if not (float(v) > 0 and float(v) < float("inf")):
        raise ctx.fail(key, f"expected a positive number, got {v!r}")
    return float(v)


def _columns(ctx: _Ctx, raw: dict, key: str, default: tuple[str, str]) -> tuple[str, str]:
    v = raw.get(key)
    if v is None:
        return default
    if (
        not isinstance(v, list | tuple)
        or len(v) != 2
        or not all(isinstance(c, str) and c for c in v)
    ):
        raise ctx.fail(key, f"expected two column names [x_column, y_column], got {v!r}")
    return (v[0], v[1])


def _template(ctx: _Ctx, raw: dict, key: str, default: str | None) -> str | None:
    v = _str(ctx, raw, key, default)
    if v is None:
        return None
    try:
        parsed = list(string.Formatter().parse(v))
    except ValueError as e:
        raise ctx.fail(key, f"bad template {v!r}: {e}") from None
    names = [f for _, f, _, _ in parsed if f is not None]
    if not names:
        raise ctx.fail(key, f'template {v!r} names no column (write e.g. "{{x}}x{{y}}")')
    if any(n == "" or n.isdigit() for n in names):
        raise ctx.fail(key, f'template {v!r}: fields must be column names, e.g. "{{x}}x{{y}}"')
    return v


def _path(ctx: _Ctx, raw: dict, key: str, base: Path, *, check: bool, folder: bool = False):
    v = raw.get(key)
    if v is None:
        return None
    if not isinstance(v, str) or not v.strip():
        raise ctx.fail(key, f"expected a path, got {v!r}")
    p = Path(os.path.expandvars(os.path.expanduser(v)))
    if not p.is_absolute():
        p = base / p
    p = Path(os.path.normpath(p))
    if check:
        if not p.exists():
            raise ctx.fail(key, f"not found: {p}")
        if folder and not p.is_dir():
            raise ctx.fail(key, f"not a folder: {p}")
        if not folder and p.is_dir():
            raise ctx.fail(key, f"is a folder, expected a file: {p}")
    return p


def _scale(ctx: _Ctx, raw: dict, key: str, kind: str) -> float | str | None:
    v = raw.get(key)
    if v is None:
        return None
    if isinstance(v, str) and kind in ("visium", "h5ad"):
        if v not in NAMED_SCALES:
            raise ctx.fail(key, f"expected a number or one of {', '.join(NAMED_SCALES)}, got {v!r}")
        return v
    return _positive(ctx, raw, key)


def _parse_section(
    raw: Any, index: int, defaults: dict, base: Path, manifest: Path, *, check: bool
) -> SectionSpec:
    ctx = _Ctx(manifest, f"#{index + 1}")
    if not isinstance(raw, dict):
        raise ctx.fail(None, f"expected a mapping of fields, got {type(raw).__name__}")
    raw = {**defaults, **raw}
    name = raw.get("name")
    if name is None:
        raise ctx.fail("name", "missing (every section needs a unique name)")
    name = _str(ctx, raw, "name")
    ctx.section = name
    _check_keys(ctx, raw, _SECTION_KEYS, "section")

    sources = [k for k in SOURCE_KEYS if raw.get(k) is not None]
    if len(sources) != 1:
        got = f"got {', '.join(sources)}" if sources else "got none"
        raise ctx.fail(
            None,
            f"give exactly one of counts (+ spots), visium, h5ad; {got} "
            "(other sources: spatialdata, visium_hd, xenium)",
        )
    kind: SectionKind = "table" if sources[0] == "counts" else sources[0]  # type: ignore[assignment]

    table_only = (
        "spots",
        "spot_id",
        "pixel_columns",
        "selected_column",
        "transpose",
        "coordinates",
    )
    other_only = ("layer", "spatial_key", "gene_column")
    if kind == "table":
        if raw.get("spots") is None:
            raise ctx.fail(
                "spots", "missing: a counts table needs a spots table with pixel columns"
            )
        bad = [k for k in other_only if k in raw]
    else:
        bad = [k for k in table_only if k in raw]
        if kind in ("visium", *_SPATIALDATA_KINDS) and "spatial_key" in raw:
            bad.append("spatial_key")
        if kind != "spatialdata" and "elements" in raw:
            bad.append("elements")
        if kind != "visium_hd" and "bin_size" in raw:
            bad.append("bin_size")
    if kind == "table":
        bad += [k for k in ("elements", "bin_size") if k in raw]
    if bad:
        raise ctx.fail(bad[0], f"does not apply to a {kind} section")

    transpose = raw.get("transpose", False)
    if not isinstance(transpose, bool):
        raise ctx.fail("transpose", f"expected true/false, got {transpose!r}")

    coords = None
    if raw.get("coordinates") is not None:
        c = raw["coordinates"]
        cctx = _Ctx(manifest, name)
        if not isinstance(c, dict):
            raise cctx.fail(
                "coordinates", "expected a mapping with table, spot_id, pixel_columns, scale"
            )
        for k in c:
            if k not in _COORD_KEYS:
                raise cctx.fail(f"coordinates.{k}", f"unknown key{_suggest(str(k), _COORD_KEYS)}")
        table = _path(cctx, c, "table", base, check=check)
        if table is None:
            raise cctx.fail("coordinates.table", "missing")
        coords = CoordinateTable(
            table=table,
            spot_id=_template(cctx, c, "spot_id", "{x}x{y}") or "{x}x{y}",
            pixel_columns=_columns(cctx, c, "pixel_columns", ("pixel_x", "pixel_y")),
            scale=_positive(cctx, c, "scale") or 1.0,
        )

    elements = None
    if raw.get("elements") is not None:
        e = raw["elements"]
        ectx = _Ctx(manifest, name)
        if not isinstance(e, dict):
            raise ectx.fail(
                "elements", f"expected a mapping with {', '.join(_ELEMENT_KEYS)} (element names)"
            )
        for k in e:
            if k not in _ELEMENT_KEYS:
                raise ectx.fail(
                    f"elements.{k}", f"unknown key{_suggest(str(k), set(_ELEMENT_KEYS))}"
                )
        elements = SpatialDataElements(**{k: _str(ectx, e, k) for k in _ELEMENT_KEYS})
    bin_size = raw.get("bin_size")
    if bin_size is not None and (
        isinstance(bin_size, bool) or not isinstance(bin_size, int) or bin_size <= 0
    ):
        raise ctx.fail(
            "bin_size", f"expected a positive whole number of µm (2, 8, 16), got {bin_size!r}"
        )

    label_column = _str(ctx, raw, "label_column", "label") or "label"
    labels = _path(ctx, raw, "labels", base, check=check)
    if labels is None and "labels_spot_id" in raw:
        raise ctx.fail("labels_spot_id", "given without a labels table")

    spec = SectionSpec(
        name=name,
        kind=kind,
        manifest=manifest,
        patient=_str(ctx, raw, "patient", name) or name,
        image=_path(ctx, raw, "image", base, check=check),
        counts=_path(ctx, raw, "counts", base, check=check),
        spots=_path(ctx, raw, "spots", base, check=check),
        spot_id=_template(ctx, raw, "spot_id", "{x}x{y}") or "{x}x{y}",
        pixel_columns=_columns(ctx, raw, "pixel_columns", ("pixel_x", "pixel_y")),
        selected_column=_str(ctx, raw, "selected_column"),
        transpose=transpose,
        coordinates=coords,
        visium=_path(ctx, raw, "visium", base, check=check, folder=True),
        h5ad=_path(ctx, raw, "h5ad", base, check=check),
        layer=_str(ctx, raw, "layer"),
        spatial_key=_str(ctx, raw, "spatial_key", "spatial") or "spatial",
        gene_column=_str(ctx, raw, "gene_column"),
        spatialdata=_path(ctx, raw, "spatialdata", base, check=check, folder=True),
        visium_hd=_path(ctx, raw, "visium_hd", base, check=check, folder=True),
        xenium=_path(ctx, raw, "xenium", base, check=check, folder=True),
        elements=elements,
        bin_size=bin_size,
        scale=_scale(ctx, raw, "scale", kind),
        labels=labels,
        label_column=label_column,
        labels_spot_id=_template(ctx, raw, "labels_spot_id", None),
        mpp=_positive(ctx, raw, "mpp"),
        spot_pitch_um=_positive(ctx, raw, "spot_pitch_um"),
        spot_diameter_um=_positive(ctx, raw, "spot_diameter_um"),
    )
    if check and spec.kind == "visium":
        from napari_stpredict.st.visium import check_visium_folder

        check_visium_folder(spec)
    if check and spec.kind == "spatialdata":
        from napari_stpredict.st.spatialdata import check_spatialdata_store

        check_spatialdata_store(spec)
    elif check and spec.kind in ("visium_hd", "xenium"):
        from napari_stpredict.st.spatialdata import check_platform_folder

        check_platform_folder(spec)
    return spec


def load_manifest(path: str | os.PathLike, *, check_files: bool = True) -> Manifest:
    """Load and validate a dataset manifest.

    Parameters
    ----------
    path
        The YAML file. Relative paths inside it are resolved against its folder.
    check_files
        Check that every file and folder named exists (default). Tests of the schema alone
        can turn this off.

    Returns
    -------
    Manifest

    Raises
    ------
    DatasetError
        One line naming the manifest, the section and the field: unreadable YAML, unknown or
        mistyped keys, duplicate section names, a section with no or several data sources,
        missing files.

    Examples
    --------
    >>> m = load_manifest("benchmarks/data/her2st.yaml")  # doctest: +SKIP
    >>> [s.name for s in m.sections]  # doctest: +SKIP
    ['B4', 'C2', 'C3', 'C4', 'A2']
    """
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path}: manifest not found")
    if path.is_dir():
        raise DatasetError(f"{path}: is a folder, expected a YAML manifest")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise DatasetError(f"{path}: not a text (YAML) file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or "syntax error"
        raise DatasetError(f"{path}: not valid YAML{line}: {problem}") from None
    ctx = _Ctx(path)
    if not isinstance(raw, dict):
        raise ctx.fail(None, "expected a mapping with a 'sections' list")
    _check_keys(ctx, raw, _TOP_KEYS, "top-level")
    base = path.resolve().parent
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise ctx.fail("defaults", "expected a mapping of section fields")
    for key in defaults:
        if key not in _SECTION_KEYS or key == "name":
            raise ctx.fail(
                f"defaults.{key}", f"not a shared section field{_suggest(str(key), _SECTION_KEYS)}"
            )
    sections_raw = raw.get("sections")
    if not isinstance(sections_raw, list) or not sections_raw:
        raise ctx.fail("sections", "expected a non-empty list of sections")
    sections = [
        _parse_section(s, i, defaults, base, path, check=check_files)
        for i, s in enumerate(sections_raw)
    ]
    seen: set[str] = set()
    for s in sections:
        if s.name in seen:
            raise DatasetError(f"{path}: section name {s.name!r} is used twice")
        seen.add(s.name)
    name = _str(ctx, raw, "name", path.stem) or path.stem
    genes = _path(ctx, raw, "genes", base, check=check_files)
    description = _str(ctx, raw, "description") or ""
    return Manifest(path=path, name=name, sections=sections, genes=genes, description=description)
