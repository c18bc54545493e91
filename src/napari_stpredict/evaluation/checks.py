"""Up-front checks of an evaluation: methods, set sizes, training options, genes, scoring options.

Each refuses a bad value in one line before any fold trains (an evaluation can run for hours).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from typing import Any

from napari_stpredict.errors import StPredictError
from napari_stpredict.evaluation.data import SectionData

__all__ = [
    "METHODS",
    "PREDICTOR_OPTIONS",
    "check_genes",
    "check_method_configs",
    "check_methods",
    "check_n_top",
    "check_predictor_options",
]

#: The methods :func:`~napari_stpredict.evaluation.evaluate` trains and compares.
METHODS: tuple[str, ...] = ("cmrc", "bleep", "regression", "ridge")
#: Scoring overrides passed on to :class:`~napari_stpredict.model.Predictor`.
PREDICTOR_OPTIONS = ("tta", "top_k", "weighting", "temperature")


def check_methods(methods: Sequence[str]) -> list[str]:
    """The methods without repeats, in order; unknown names or none at all are refused."""
    methods = list(dict.fromkeys(methods))
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise StPredictError(
            f"--methods {','.join(methods)}: unknown {unknown} (use {','.join(METHODS)})"
        )
    return methods


def check_n_top(n_top: int) -> None:
    """The HEG/HVG set size must be at least 1."""
    if n_top < 1:
        raise StPredictError(f"--n-top {n_top}: must be at least 1")


def check_method_configs(config: Any, methods: Sequence[str]) -> None:
    """Bad training options fail here, in a second, not once per fold (``config.validate()``
    of each method's config, when the config has one)."""
    for method in methods:
        validate = getattr(dataclasses.replace(config, method=method), "validate", None)
        if validate is not None:
            validate()


def check_predictor_options(options: dict[str, Any] | None) -> dict[str, Any]:
    """Validate scoring overrides up front (one line naming the bad value)."""
    from napari_stpredict.model.retrieval import WEIGHTINGS

    opts = {k: v for k, v in (options or {}).items() if v is not None}
    unknown = sorted(set(opts) - set(PREDICTOR_OPTIONS))
    if unknown:
        raise StPredictError(
            f"predictor option {unknown[0]!r}: unknown (use {', '.join(PREDICTOR_OPTIONS)})"
        )
    if "tta" in opts and opts["tta"] not in (1, 2, 4, 8):
        raise StPredictError(f"--tta {opts['tta']}: choose 1, 2, 4 or 8")
    if "top_k" in opts and int(opts["top_k"]) < 1:
        raise StPredictError(f"--top-k {opts['top_k']}: must be ≥ 1")
    if "weighting" in opts and opts["weighting"] not in WEIGHTINGS:
        raise StPredictError(f"--weighting {opts['weighting']}: choose {' or '.join(WEIGHTINGS)}")
    if "temperature" in opts and not float(opts["temperature"]) > 0:
        raise StPredictError(f"--temperature {opts['temperature']}: must be > 0")
    return opts


def check_genes(config: Any, sections: Sequence[SectionData]) -> None:
    """Refuse, before any training, a gene list the sections cannot satisfy.

    Genes are resolved like training does (:func:`napari_stpredict.st.select_genes` with the
    config's ``missing_genes``): with ``"error"`` every listed gene must be measured in every
    section, with ``"drop"`` at least one must be. ``genes=None`` (the default panel) passes.
    """
    genes = getattr(config, "genes", None)
    if genes is None:
        return
    from napari_stpredict.st import select_genes

    adatas = list({s.name: s.adata for s in sections}.values())
    missing = getattr(config, "missing_genes", "error")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kept = select_genes(adatas, gene_list=genes, missing=missing)
    if not kept:
        raise StPredictError("--genes: none of the listed genes is measured in every section")
