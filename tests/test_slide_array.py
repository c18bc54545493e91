"""``Slide.from_array`` (a slide without a file) and the one suffix list (issue 13)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from napari_stpredict.errors import SlideError
from napari_stpredict.slide import SLIDE_SUFFIXES, Slide, is_slide_path, open_slide, tissue_mask


def test_from_array_reads_like_a_file(tmp_path) -> None:
    import imagecodecs

    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (1500, 2300, 3), dtype=np.uint8)
    s = Slide.from_array(img, mpp=0.5, name="synthetic")
    assert s.format == "array" and s.shape == (1500, 2300) and s.mpp == 0.5
    assert s.units == "µm" and s.layer_scale == (0.5, 0.5)
    assert len(s.levels) == 3 and s.downsamples == [1.0, 2.0, 4.0]  # lazy 2× levels below
    assert np.array_equal(s.read_region(0, 10, 20, 30, 40), img[10:40, 20:60])
    assert (s.read_region(0, -5, -5, 10, 10)[:5] == 255).all()  # outside = glass
    # same pixels as the same image read from a PNG file
    path = tmp_path / "same.png"
    path.write_bytes(imagecodecs.png_encode(img))
    with open_slide(path, mpp=0.5) as f:
        for args in [(100.5, 200.0, 224.0, 224.0), (0, 0, 1500, 2300)]:
            a = s.read_resampled(*args, out_shape=(112, 112))
            assert np.array_equal(a, f.read_resampled(*args, out_shape=(112, 112)))
    # pickles with its pixels (no file to re-open), same fingerprint
    t = pickle.loads(pickle.dumps(s))
    assert t.shape == s.shape and t.fingerprint() == s.fingerprint() and t.mpp == 0.5
    assert np.array_equal(t.read_region(1, 0, 0, 50, 50), s.read_region(1, 0, 0, 50, 50))
    assert Slide.from_array(img[:, ::-1]).fingerprint() != s.fingerprint()
    assert Slide.from_array(img).mpp is None


def test_from_array_converts_and_refuses() -> None:
    grey = np.full((64, 80), 200, np.uint8)
    s = Slide.from_array(grey, mpp=1.0)
    assert s.read_region(0, 0, 0, 2, 2).shape == (2, 2, 3)
    rgba = np.zeros((10, 10, 4), np.uint8)  # fully transparent: glass
    assert (Slide.from_array(rgba).read_region(0, 0, 0, 10, 10) == 255).all()
    with pytest.raises(SlideError, match="float64 pixels"):
        Slide.from_array(np.zeros((10, 10, 3)))
    with pytest.raises(SlideError, match="non-empty"):
        Slide.from_array(np.zeros((0, 10, 3), np.uint8))
    with pytest.raises(SlideError, match="mpp must be a positive"):
        Slide.from_array(grey, mpp=0)


def test_tissue_mask_on_an_array_slide() -> None:
    img = np.full((800, 800, 3), 240, np.uint8)
    rng = np.random.default_rng(2)
    img[200:600, 200:600] = rng.integers(60, 220, (400, 400, 3), dtype=np.uint8)
    m = tissue_mask(Slide.from_array(img, mpp=0.5))
    assert m.fraction(250, 250, 550, 550) > 0.95 and m.fraction(0, 0, 150, 800) == 0.0


def test_one_suffix_list() -> None:
    assert ".svs" in SLIDE_SUFFIXES and ".png" in SLIDE_SUFFIXES
    assert is_slide_path("a/B.SVS") and is_slide_path("x.ome.tif") and is_slide_path("s.ome.zarr")
    assert not is_slide_path("notes.txt") and not is_slide_path("slide.mrxs")
    from napari_stpredict.cohort.inputs import slide_suffixes

    assert set(slide_suffixes()) == set(SLIDE_SUFFIXES)  # cohort reuses the list
