"""Spatial transcriptomics sections → AnnData; dataset manifest; genes; patch datasets.

>>> from napari_stpredict.st import load_manifest, read_sections, select_genes  # doctest: +SKIP
>>> m = load_manifest("benchmarks/data/her2st.yaml")  # doctest: +SKIP
>>> adatas = read_sections(m, require_images=True)  # doctest: +SKIP
>>> genes = select_genes(adatas, n_top=1000)  # doctest: +SKIP
"""

from __future__ import annotations

from napari_stpredict.st.genes import (
    GENE_ALIASES,
    Normalization,
    common_genes,
    highly_variable_genes,
    load_gene_list,
    normalize,
    resolve_aliases,
    select_genes,
)
from napari_stpredict.st.manifest import CoordinateTable, Manifest, SectionSpec, load_manifest
from napari_stpredict.st.section import estimate_spot_pitch, read_section, read_sections

__all__ = [
    "GENE_ALIASES",
    "CoordinateTable",
    "Manifest",
    "Normalization",
    "PatchDataset",
    "SectionSpec",
    "common_genes",
    "estimate_spot_pitch",
    "highly_variable_genes",
    "load_gene_list",
    "load_manifest",
    "normalize",
    "read_section",
    "read_sections",
    "resolve_aliases",
    "select_genes",
]


def __getattr__(name: str):
    # the patch dataset pulls in torch: import it on first use only
    if name == "PatchDataset":
        from napari_stpredict.st import patches

        return getattr(patches, name)
    raise AttributeError(f"module 'napari_stpredict.st' has no attribute {name!r}")
