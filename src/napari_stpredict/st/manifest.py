"""The dataset manifest: a YAML file that lists spatial transcriptomics sections.

The schema is documented in ``docs/datasets.md``. Everything is validated when the manifest is
loaded (types, unknown keys, one data source per section, files present), so that a typo fails
in a second with one line naming the manifest, the section and the field, not an hour into
training.
"""

from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from napari_stpredict.errors import DatasetError
from napari_stpredict.st.manifest_fields import (
    FieldContext,
    bin_size_field,
    bool_field,
    check_keys,
    columns_field,
    coordinates_field,
    did_you_mean,
    elements_field,
    path_field,
    positive_field,
    scale_field,
    str_field,
    template_field,
)
from napari_stpredict.st.manifest_types import (
    NAMED_SCALES,
    SOURCE_KEYS,
    CoordinateTable,
    Manifest,
    SectionKind,
    SectionSpec,
    SpatialDataElements,
)

__all__ = [
    "NAMED_SCALES",
    "SOURCE_KEYS",
    "CoordinateTable",
    "Manifest",
    "SectionKind",
    "SectionSpec",
    "SpatialDataElements",
    "load_manifest",
]

_TOP_KEYS = {"name", "description", "defaults", "sections", "genes"}
_SECTION_KEYS = {f.name for f in fields(SectionSpec)} - {"kind", "manifest"}
_SPATIALDATA_KINDS = ("spatialdata", "visium_hd", "xenium")
#: fields that only a table section has, and fields that a table section never has
_TABLE_ONLY = ("spots", "spot_id", "pixel_columns", "selected_column", "transpose", "coordinates")
_NOT_TABLE = ("layer", "spatial_key", "gene_column")


def _parse_section(
    raw: Any, index: int, defaults: dict, base: Path, manifest: Path, *, check: bool
) -> SectionSpec:
    """One entry of ``sections:`` (``defaults`` under it) → a checked :class:`SectionSpec`."""
    ctx = FieldContext(manifest, f"#{index + 1}")
    raw = _named_section(ctx, raw, defaults)
    kind = _section_kind(ctx, raw)
    _refuse_foreign_fields(ctx, raw, kind)
    spec = _section_spec(ctx, raw, kind, base, check=check)
    if check:
        _check_source(spec)
    return spec


def _named_section(ctx: FieldContext, raw: Any, defaults: dict) -> dict:
    """The section's fields over the defaults; its name becomes the context's section."""
    if not isinstance(raw, dict):
        raise ctx.fail(None, f"expected a mapping of fields, got {type(raw).__name__}")
    raw = {**defaults, **raw}
    if raw.get("name") is None:
        raise ctx.fail("name", "missing (every section needs a unique name)")
    ctx.section = str_field(ctx, raw, "name")
    check_keys(ctx, raw, _SECTION_KEYS, "section")
    return raw


def _section_kind(ctx: FieldContext, raw: dict) -> SectionKind:
    """The kind, from the one data-source field given."""
    sources = [k for k in SOURCE_KEYS if raw.get(k) is not None]
    if len(sources) != 1:
        got = f"got {', '.join(sources)}" if sources else "got none"
        raise ctx.fail(
            None,
            f"give exactly one of counts (+ spots), visium, h5ad; {got} "
            "(other sources: spatialdata, visium_hd, xenium)",
        )
    return "table" if sources[0] == "counts" else sources[0]  # type: ignore[return-value]


def _refuse_foreign_fields(ctx: FieldContext, raw: dict, kind: SectionKind) -> None:
    """Refuse fields that do not apply to the kind (and a table section without spots)."""
    if kind == "table":
        if raw.get("spots") is None:
            raise ctx.fail(
                "spots", "missing: a counts table needs a spots table with pixel columns"
            )
        bad = [k for k in (*_NOT_TABLE, "elements", "bin_size") if k in raw]
    else:
        bad = [k for k in _TABLE_ONLY if k in raw]
        if kind in ("visium", *_SPATIALDATA_KINDS) and "spatial_key" in raw:
            bad.append("spatial_key")
        if kind != "spatialdata" and "elements" in raw:
            bad.append("elements")
        if kind != "visium_hd" and "bin_size" in raw:
            bad.append("bin_size")
    if bad:
        raise ctx.fail(bad[0], f"does not apply to a {kind} section")


def _section_spec(
    ctx: FieldContext, raw: dict, kind: SectionKind, base: Path, *, check: bool
) -> SectionSpec:
    """Every field read and checked, in the order the errors are reported."""
    name = str(ctx.section)
    transpose = bool_field(ctx, raw, "transpose")
    coordinates = coordinates_field(ctx, raw, base, check=check)
    elements = elements_field(ctx, raw)
    bin_size = bin_size_field(ctx, raw)
    label_column = str_field(ctx, raw, "label_column", "label") or "label"
    labels = path_field(ctx, raw, "labels", base, check=check)
    if labels is None and "labels_spot_id" in raw:
        raise ctx.fail("labels_spot_id", "given without a labels table")

    def path(key: str, folder: bool = False) -> Path | None:
        return path_field(ctx, raw, key, base, check=check, folder=folder)

    return SectionSpec(
        name=name,
        kind=kind,
        manifest=ctx.manifest,
        patient=str_field(ctx, raw, "patient", name) or name,
        image=path("image"),
        counts=path("counts"),
        spots=path("spots"),
        spot_id=template_field(ctx, raw, "spot_id", "{x}x{y}") or "{x}x{y}",
        pixel_columns=columns_field(ctx, raw, "pixel_columns", ("pixel_x", "pixel_y")),
        selected_column=str_field(ctx, raw, "selected_column"),
        transpose=transpose,
        coordinates=coordinates,
        visium=path("visium", folder=True),
        h5ad=path("h5ad"),
        layer=str_field(ctx, raw, "layer"),
        spatial_key=str_field(ctx, raw, "spatial_key", "spatial") or "spatial",
        gene_column=str_field(ctx, raw, "gene_column"),
        spatialdata=path("spatialdata", folder=True),
        visium_hd=path("visium_hd", folder=True),
        xenium=path("xenium", folder=True),
        elements=elements,
        bin_size=bin_size,
        scale=scale_field(ctx, raw, "scale", kind),
        labels=labels,
        label_column=label_column,
        labels_spot_id=template_field(ctx, raw, "labels_spot_id", None),
        mpp=positive_field(ctx, raw, "mpp"),
        spot_pitch_um=positive_field(ctx, raw, "spot_pitch_um"),
        spot_diameter_um=positive_field(ctx, raw, "spot_diameter_um"),
    )


def _check_source(spec: SectionSpec) -> None:
    """The kind's own checks of its data source (folders and stores, before any reading)."""
    if spec.kind == "visium":
        from napari_stpredict.st.visium import check_visium_folder

        check_visium_folder(spec)
    elif spec.kind == "spatialdata":
        from napari_stpredict.st.spatialdata import check_spatialdata_store

        check_spatialdata_store(spec)
    elif spec.kind in ("visium_hd", "xenium"):
        from napari_stpredict.st.spatialdata import check_platform_folder

        check_platform_folder(spec)


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
    ctx = FieldContext(path)
    if not isinstance(raw, dict):
        raise ctx.fail(None, "expected a mapping with a 'sections' list")
    check_keys(ctx, raw, _TOP_KEYS, "top-level")
    base = path.resolve().parent
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise ctx.fail("defaults", "expected a mapping of section fields")
    for key in defaults:
        if key not in _SECTION_KEYS or key == "name":
            raise ctx.fail(
                f"defaults.{key}",
                f"not a shared section field{did_you_mean(str(key), _SECTION_KEYS)}",
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
    name = str_field(ctx, raw, "name", path.stem) or path.stem
    genes = path_field(ctx, raw, "genes", base, check=check_files)
    description = str_field(ctx, raw, "description") or ""
    return Manifest(path=path, name=name, sections=sections, genes=genes, description=description)
