"""Gene aliases, gene panels (HVG union, gene lists) and normalization."""

from __future__ import annotations

import json
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from napari_stpredict.errors import DatasetError
from napari_stpredict.st import (
    GENE_ALIASES,
    Normalization,
    common_genes,
    highly_variable_genes,
    load_gene_list,
    normalize,
    read_sections,
    resolve_aliases,
    select_genes,
)

PANEL = "hist2st_her_hvg_cut_1000.npy"


@pytest.fixture(scope="module")
def her2st(her2st_dir, benchmarks_data_dir):
    return read_sections(benchmarks_data_dir / "her2st.yaml", check_image=False)


# ---------------------------------------------------------------- aliases


def test_pam50_aliases():
    assert resolve_aliases(["CDCA1", "KNTC2", "ORC6L", "ERBB2"]) == [
        "NUF2",
        "NDC80",
        "ORC6",
        "ERBB2",
    ]
    assert GENE_ALIASES["CDCA1"] == "NUF2"


def test_alias_not_applied_when_target_present():
    # both symbols in one table: nothing merged, nothing duplicated
    assert resolve_aliases(["CDCA1", "NUF2"]) == ["CDCA1", "NUF2"]
    assert resolve_aliases(["X1"], aliases={"X1": "Y1"}) == ["Y1"]
    assert resolve_aliases(["CDCA1"], aliases={}) == ["CDCA1"]


def test_section_var_names_use_current_symbols(her2st):
    for a in her2st:
        names = set(a.var_names)
        # the HER2ST counts use pre-2019 symbols; sections come out with the current ones
        assert "MARS1" in names and "MARS" not in names
        assert "PCLAF" in names and "KIAA0101" not in names
        assert "ERBB2" in names


# ---------------------------------------------------------------- gene lists


def test_her2st_785_gene_panel(her2st, shared_data):
    path = shared_data / "genelists" / PANEL
    raw = load_gene_list(path)
    assert len(raw) == 785
    genes = select_genes(her2st, gene_list=path)
    # every one of the 785 is measured in all five image sections (after alias resolution:
    # the panel and the counts both use old symbols such as MARS → MARS1)
    assert len(genes) == 785
    assert genes == resolve_aliases(raw)
    assert "MARS1" in genes and "MARS" in raw
    for a in her2st:
        assert set(genes) <= set(a.var_names)


def test_pam50_list_missing_genes(her2st, shared_data):
    path = shared_data / "genelists" / "genefu_pam50_model.csv"
    raw = load_gene_list(path)  # '#' comment lines skipped, column 'probe'
    assert len(raw) == 50 and raw[0] == "ACTR3B" and "CDCA1" in raw
    with pytest.raises(
        DatasetError,
        match=r"genefu_pam50_model\.csv: 3 of 50 genes are not measured in every section",
    ) as exc:
        select_genes(her2st, gene_list=path)
    msg = str(exc.value)
    for g in ("KRT14", "KRT5", "MIA"):
        assert g in msg
    assert "CDCA1" not in msg  # resolved to NUF2
    with pytest.warns(UserWarning, match="dropping 3 of 50"):
        genes = select_genes(her2st, gene_list=path, missing="drop")
    assert len(genes) == 47 and "NUF2" in genes and "NDC80" in genes and "ORC6" in genes


def test_unknown_genes_in_list_error(her2st):
    with pytest.raises(
        DatasetError,
        match=r"gene list: 2 of 3 genes are not measured in every section: 2 in no section \(NOTAGENE1, NOTAGENE2\)",
    ):
        select_genes(her2st, gene_list=["ERBB2", "NOTAGENE1", "NOTAGENE2"])
    with pytest.raises(DatasetError, match="none of its 1 genes"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        select_genes(her2st, gene_list=["NOTAGENE1"], missing="drop")


def test_gene_list_formats(tmp_path):
    (tmp_path / "g.txt").write_text("# my panel\nERBB2\n\nGRB7  # amplicon\nERBB2\n")
    assert load_gene_list(tmp_path / "g.txt") == ["ERBB2", "GRB7"]
    pd.DataFrame({"score": [1, 2], "symbol": ["ESR1", "PGR"]}).to_csv(
        tmp_path / "g.csv", index=False
    )
    assert load_gene_list(tmp_path / "g.csv") == ["ESR1", "PGR"]
    assert load_gene_list(tmp_path / "g.csv", column="score") == ["1", "2"]
    with pytest.raises(DatasetError, match="has no column 'gene_id'"):
        load_gene_list(tmp_path / "g.csv", column="gene_id")
    np.save(tmp_path / "g.npy", np.array(["MKI67", "TOP2A"]))
    assert load_gene_list(tmp_path / "g.npy") == ["MKI67", "TOP2A"]
    np.save(tmp_path / "obj.npy", np.array(["MKI67", None], dtype=object), allow_pickle=True)
    with pytest.raises(DatasetError, match=r"obj\.npy: gene list \.npy holds Python objects"):
        load_gene_list(tmp_path / "obj.npy")
    (tmp_path / "g.json").write_text(json.dumps(["A", "B"]))
    assert load_gene_list(tmp_path / "g.json") == ["A", "B"]
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    with pytest.raises(DatasetError, match="gene list is empty"):
        load_gene_list(tmp_path / "empty.txt")
    with pytest.raises(DatasetError, match="gene list not found"):
        load_gene_list(tmp_path / "none.txt")


# ---------------------------------------------------------------- HVG union


def test_hvg_union_over_shared_genes(her2st):
    genes = select_genes(her2st, n_top=100)
    shared = set(common_genes(her2st))
    assert genes == sorted(genes)
    assert set(genes) <= shared
    assert 100 < len(genes) <= 500  # a union, not an intersection
    # it is exactly the union of each section's own top 100 among the shared genes
    union = set()
    for a in her2st:
        cols = [i for i, g in enumerate(a.var_names) if g in shared]
        X = sp.csr_matrix(a.X)
        union |= set(
            highly_variable_genes(
                X[:, cols],
                n_top=100,
                genes=[a.var_names[i] for i in cols],
                library_size=np.asarray(X.sum(axis=1)).ravel(),
            )
        )
    assert set(genes) == union
    # breast cancer sections: immunoglobulin / HER2 amplicon / secreted genes are variable
    assert {"IGKC", "ERBB2"} & set(genes)


def test_hvg_ranks_an_overdispersed_gene_first():
    rng = np.random.default_rng(0)
    n, g = 300, 200
    means = np.geomspace(2, 100, g)
    X = rng.poisson(means, (n, g)).astype(float)
    X[:, 7] = rng.poisson(rng.gamma(0.3, means[7] / 0.3, n))  # same mean, much larger variance
    genes = [f"g{i}" for i in range(g)]
    assert highly_variable_genes(sp.csr_matrix(X), n_top=1, genes=genes) == ["g7"]
    X[:, 9] = 0  # never detected: not ranked
    assert "g9" not in highly_variable_genes(sp.csr_matrix(X), n_top=g, genes=genes)


def test_sections_with_no_shared_genes(her2st, mob_dir, benchmarks_data_dir):
    mob = read_sections(benchmarks_data_dir / "mob.yaml", sections=["MOB1"], check_image=False)
    with pytest.raises(
        DatasetError,
        match=r"sections B4, MOB1 share no gene names \(B4 has '.+', MOB1 has 'ENSMUSG",
    ):
        select_genes([her2st[0], mob[0]], n_top=10)


def test_select_genes_mob(mob_dir, benchmarks_data_dir):
    mob = read_sections(benchmarks_data_dir / "mob.yaml", check_image=False)
    genes = select_genes(mob, n_top=50)
    assert 50 <= len(genes) <= 150 and all(g.startswith("ENSMUSG") for g in genes)


# ---------------------------------------------------------------- normalization


def test_log1p_cpm_normalization():
    X = sp.csr_matrix(np.array([[1.0, 3.0, 0.0], [0.0, 0.0, 0.0], [2.0, 2.0, 4.0]]))
    out = normalize(X)
    assert out.dtype == np.float32 and out.shape == (3, 3)
    assert out[0] == pytest.approx(np.log1p([2500.0, 7500.0, 0.0]))
    assert (out[1] == 0).all()  # empty spot stays zero, no NaN
    # library size over all genes when only a panel is normalized
    lib = np.asarray(X.sum(axis=1)).ravel()
    sub = normalize(X[:, :1], library_size=lib)
    assert sub[:, 0] == pytest.approx(out[:, 0])
    assert normalize(X, method="cpm", target_sum=100)[2] == pytest.approx([25, 25, 50])
    assert normalize(X, method="log1p")[0] == pytest.approx(np.log1p([1, 3, 0]))
    assert normalize(X.toarray(), method="none")[2] == pytest.approx([2, 2, 4])


def test_normalization_object_roundtrip():
    n = Normalization(method="log1p_cpm", target_sum=1e6)
    d = json.loads(json.dumps(n.to_dict()))
    assert Normalization.from_dict(d) == n
    assert Normalization.from_dict(None) == Normalization()
    assert Normalization.from_dict("cpm").method == "cpm"
    X = np.array([[1.0, 1.0]])
    assert n(X)[0] == pytest.approx(np.log1p([5e5, 5e5]))
    with pytest.raises(DatasetError, match="normalization method 'zscore'"):
        Normalization.from_dict({"method": "zscore"})
    with pytest.raises(DatasetError, match="target_sum"):
        Normalization(target_sum=0)
    with pytest.raises(DatasetError, match="unknown key 'scale'"):
        Normalization.from_dict({"method": "cpm", "scale": 2})


def test_normalization_on_real_counts(her2st):
    a = her2st[0]
    out = normalize(a.X[:, :200], library_size=np.asarray(a.X.sum(axis=1)).ravel())
    assert np.isfinite(out).all() and out.min() >= 0
    # expm1 back to counts-per-10k: each row's panel share matches the raw counts' share
    share = np.expm1(out.astype(np.float64)).sum(axis=1) / 1e4
    raw_share = np.asarray(a.X[:, :200].sum(axis=1)).ravel() / np.asarray(a.X.sum(axis=1)).ravel()
    assert share == pytest.approx(raw_share, rel=1e-4)


def test_anndata_write_of_section(her2st, tmp_path):
    """Sections (with None in uns) can be saved by users."""
    a = her2st[0]
    a[:10].copy().write_h5ad(tmp_path / "b4.h5ad")
    b = ad.read_h5ad(tmp_path / "b4.h5ad")
    assert b.uns["stpredict"]["section"] == "B4"
