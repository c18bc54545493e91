"""Dataset manifest: the shipped manifests load, and every mistake is one clear line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from napari_stpredict.errors import DatasetError
from napari_stpredict.st import load_manifest


def _write(tmp_path: Path, text: str, name: str = "data.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.fixture
def files(tmp_path: Path) -> Path:
    """Empty stand-in files so that schema tests can name existing paths."""
    for name in ("c.tsv", "s.tsv", "img.png", "labels.tsv", "x.h5ad", "coords.tsv"):
        (tmp_path / name).write_text("x\n")
    (tmp_path / "outs").mkdir()
    return tmp_path


# ---------------------------------------------------------------- shipped manifests (real data)


def test_her2st_manifest(her2st_dir, benchmarks_data_dir):
    m = load_manifest(benchmarks_data_dir / "her2st.yaml")
    assert m.name == "her2st"
    assert m.names == ["B4", "C2", "C3", "C4", "A2"]
    assert m.patients() == {"B": ["B4"], "C": ["C2", "C3", "C4"], "A": ["A2"]}
    for s in m.sections:
        assert s.kind == "table"
        assert s.image is not None and s.image.exists()
        assert s.counts.exists() and s.spots.exists()
        assert s.spot_pitch_um == 200
        assert s.selected_column == "selected"
        # paths are resolved relative to the manifest and point into ../shared/data
        assert s.image.is_absolute() and "shared" in s.image.parts
    a2 = m.section("A2")
    assert a2.image.name == "A2_dark.png"
    assert a2.coordinates is not None
    assert a2.coordinates.pixel_columns == ("warped_x", "warped_y")
    assert a2.coordinates.scale == pytest.approx(2000 / 6966)
    assert m.section("B4").coordinates is None
    # JSON-able description
    json.dumps(a2.to_dict())


def test_labelled_manifest_has_no_images(her2st_dir, benchmarks_data_dir):
    m = load_manifest(benchmarks_data_dir / "her2st_labelled.yaml")
    assert m.names == ["B1", "C1", "D1", "E1", "F1", "G2", "H1"]
    for s in m.sections:
        assert s.image is None
        assert s.labels is not None and s.labels.exists()
        assert s.labels_spot_id == "{x:.0f}x{y:.0f}"


def test_mob_and_visium_manifests(mob_dir, shared_data, benchmarks_data_dir):
    m = load_manifest(benchmarks_data_dir / "mob.yaml")
    assert m.names == ["MOB1", "MOB2", "MOB3"]
    assert {s.patient for s in m.sections} == {"mouse1"}
    v = load_manifest(benchmarks_data_dir / "visium_tiny.yaml")
    (s,) = v.sections
    assert s.kind == "visium" and s.scale == "hires"
    assert s.visium.is_dir()


def test_select_and_unknown_section(her2st_dir, benchmarks_data_dir):
    m = load_manifest(benchmarks_data_dir / "her2st.yaml")
    assert [s.name for s in m.select(["C3", "B4"])] == ["C3", "B4"]
    assert len(m.select(None)) == 5
    with pytest.raises(DatasetError, match=r"no section 'Z9' \(sections: B4, C2"):
        m.select(["Z9"])


# ---------------------------------------------------------------- schema and validation


def test_minimal_manifest_and_defaults(files):
    p = _write(
        files,
        """
defaults:
  spot_pitch_um: 200
sections:
  - {name: S1, counts: c.tsv, spots: s.tsv, image: img.png}
  - {name: S2, patient: P, counts: c.tsv, spots: s.tsv, spot_pitch_um: 100, mpp: 0.5}
""",
    )
    m = load_manifest(p)
    s1, s2 = m.sections
    assert m.name == "data"
    assert s1.patient == "S1" and s1.spot_pitch_um == 200 and s1.mpp is None
    assert s1.spot_id == "{x}x{y}" and s1.pixel_columns == ("pixel_x", "pixel_y")
    assert s1.image == files / "img.png" and s1.counts == files / "c.tsv"
    assert s2.patient == "P" and s2.spot_pitch_um == 100 and s2.mpp == 0.5
    assert s2.image is None


def test_paths_relative_to_manifest_not_cwd(files, monkeypatch, tmp_path_factory):
    p = _write(files, "sections:\n  - {name: S, counts: c.tsv, spots: s.tsv}\n")
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    assert load_manifest(p).sections[0].counts == files / "c.tsv"


@pytest.mark.parametrize(
    ("body", "pattern"),
    [
        (
            "sections:\n  - {name: S, counts: nope.tsv, spots: s.tsv}\n",
            r"data\.yaml: section 'S': field 'counts': not found: .*nope\.tsv",
        ),
        (
            "sections:\n  - {name: S, counts: c.tsv, spots: s.tsv, image: missing.jpg}\n",
            r"section 'S': field 'image': not found",
        ),
        (
            "sections:\n  - {name: S, counts: c.tsv, spots: s.tsv, spot_pich_um: 200}\n",
            r"section 'S': field 'spot_pich_um': unknown section key \(did you mean 'spot_pitch_um'\?\)",
        ),
        (
            "sections:\n  - {name: S, counts: c.tsv}\n",
            r"section 'S': field 'spots': missing",
        ),
        (
            "sections:\n  - {name: S, counts: c.tsv, spots: s.tsv, h5ad: x.h5ad}\n",
            r"section 'S': give exactly one of counts \(\+ spots\), visium, h5ad; got counts, h5ad",
        ),
        (
            "sections:\n  - {name: S, image: img.png}\n",
            r"section 'S': give exactly one of .*; got none",
        ),
        (
            "sections:\n  - {counts: c.tsv, spots: s.tsv}\n",
            r"section '#1': field 'name': missing",
        ),
        (
            "sections:\n  - {name: S, counts: c.tsv, spots: s.tsv}\n  - {name: S, counts: c.tsv, spots: s.tsv}\n",
            r"section name 'S' is used twice",
        ),
        (
            "sections:\n  - {name: S, counts: c.tsv, spots: s.tsv, mpp: -1}\n",
            r"field 'mpp': expected a positive number, got -1",
        ),
        (
            "sections:\n  - {name: S, counts: c.tsv, spots: s.tsv, scale: hires}\n",
            r"field 'scale': expected a positive number, got 'hires'",
        ),
        (
            "sections:\n  - {name: S, counts: c.tsv, spots: s.tsv, pixel_columns: [px]}\n",
            r"field 'pixel_columns': expected two column names",
        ),
        (
            "sections:\n  - {name: S, counts: c.tsv, spots: s.tsv, spot_id: 'spot'}\n",
            r"field 'spot_id': template 'spot' names no column",
        ),
        (
            "sections:\n  - {name: S, h5ad: x.h5ad, selected_column: sel}\n",
            r"field 'selected_column': does not apply to a h5ad section",
        ),
        (
            "sections:\n  - {name: S, counts: c.tsv, spots: s.tsv, labels_spot_id: '{x}'}\n",
            r"field 'labels_spot_id': given without a labels table",
        ),
        (
            "sections:\n  - {name: S, counts: c.tsv, spots: s.tsv, coordinates: {table: coords.tsv, colums: [a, b]}}\n",
            r"field 'coordinates.colums': unknown key",
        ),
        (
            "sections:\n  - {name: S, visium: outs}\n",
            r"field 'visium': .*outs has no filtered_feature_bc_matrix\.h5",
        ),
        ("sections: []\n", r"field 'sections': expected a non-empty list"),
        ("- a\n- b\n", r"data\.yaml: expected a mapping with a 'sections' list"),
        ("sections:\n  - {name: S\n", r"data\.yaml: not valid YAML at line \d+"),
        ("section: []\n", r"field 'section': unknown top-level key \(did you mean 'sections'\?\)"),
        (
            "defaults: {name: x}\nsections: [{name: S, counts: c.tsv, spots: s.tsv}]\n",
            r"field 'defaults.name'",
        ),
    ],
)
def test_validation_errors_are_one_line(files, body, pattern):
    p = _write(files, body)
    with pytest.raises(DatasetError, match=pattern) as exc:
        load_manifest(p)
    assert "\n" not in str(exc.value)


def test_missing_manifest_and_folder(tmp_path):
    with pytest.raises(DatasetError, match="manifest not found"):
        load_manifest(tmp_path / "none.yaml")
    with pytest.raises(DatasetError, match="is a folder"):
        load_manifest(tmp_path)


def test_check_files_off_allows_missing_paths(tmp_path):
    p = _write(tmp_path, "sections:\n  - {name: S, counts: c.tsv, spots: s.tsv, image: i.jpg}\n")
    s = load_manifest(p, check_files=False).sections[0]
    assert s.counts == tmp_path / "c.tsv" and not s.counts.exists()
