import numpy as np

from histotransfer.wsi.tissue import detect_tissue, hue_degrees, optical_density, pen_mask, saturation
from tests.helpers import synthetic_slide_rgb


def test_saturation_of_grey_is_zero_and_of_pure_colour_is_full():
    rgb = np.array([[[128, 128, 128], [255, 0, 0], [0, 0, 0]]], dtype=np.uint8)
    assert saturation(rgb).tolist() == [[0, 255, 0]]


def test_blank_glass_has_no_tissue():
    rng = np.random.default_rng(0)
    glass = np.clip(242 + rng.integers(-6, 6, size=(200, 300, 3)), 0, 255).astype(np.uint8)
    assert not detect_tissue(glass, image_mpp=8.0).any()


def test_tissue_block_found_and_specks_dropped():
    rgb = synthetic_slide_rgb((300, 200), [(50, 40, 150, 140), (250, 20, 253, 23)])
    mask = detect_tissue(rgb, image_mpp=8.0)  # the 3x3 px speck is 576 um2 < 10,000 um2
    assert mask[45:135, 55:145].all()
    assert not mask[20:23, 250:253].any()
    assert mask.sum() == np.count_nonzero(mask[40:140, 50:150])  # nothing outside the block


def test_small_holes_filled_large_kept():
    rgb = synthetic_slide_rgb((400, 400), [(0, 0, 400, 400)])
    rgb[100:102, 100:102] = 242  # 2x2 px hole: 256 um2
    rgb[200:300, 200:300] = 242  # 100x100 px hole: 640,000 um2
    mask = detect_tissue(rgb, image_mpp=8.0)
    assert mask[100:102, 100:102].all()
    assert not mask[220:280, 220:280].any()


def test_marker_ink_is_not_tissue_and_does_not_move_otsu():
    rgb = synthetic_slide_rgb((300, 200), [(20, 20, 140, 180)])  # H&E-coloured block
    rgb[20:180, 180:200] = (35, 60, 165)  # a blue marker stroke on glass
    rgb[100:110, 20:140] = (25, 125, 60)  # a green stroke across the tissue
    pen = pen_mask(rgb, hue_deg=(60.0, 245.0), min_saturation=20)
    assert pen[20:180, 180:200].all()
    assert pen[100:110, 20:140].all()
    assert not pen[30:90, 30:130].any()  # H&E hues stay
    mask = detect_tissue(rgb, image_mpp=8.0, exclude=pen)
    assert not mask[pen].any()
    assert mask[30:90, 30:130].all()


def test_hue_of_h_and_e_is_outside_the_pen_range():
    tissue = np.array([[[200, 120, 170], [150, 80, 160], [230, 150, 190], [120, 60, 150]]], dtype=np.uint8)
    assert ((hue_degrees(tissue) > 245) | (hue_degrees(tissue) < 60)).all()


def test_black_ink_is_dark_grey_and_dark_stained_tissue_is_not():
    rgb = np.array([[[40, 34, 44], [60, 58, 62], [90, 30, 120], [70, 20, 60]]], dtype=np.uint8)
    assert pen_mask(rgb, hue_deg=(60.0, 245.0), min_saturation=20).tolist() == [[True, True, False, False]]


def test_optical_density_of_glass_is_low_and_of_dark_tissue_high():
    od = optical_density(np.array([[[240, 240, 240], [60, 20, 80]]], dtype=np.uint8))
    assert od[0, 0] < 0.1 < 1.0 < od[0, 1]


def _h_and_e_like(shape, seed):
    """Random pixels over every hue and saturation, with runs of glass and of equal colours (ties)."""
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8)
    rgb[: shape[0] // 4] = rng.integers(230, 256, size=(shape[0] // 4, shape[1], 1), dtype=np.uint8)
    rgb[-8:, :, 1] = rgb[-8:, :, 0]  # red and green tied for brightest
    rgb[-16:-8, :, 2] = rgb[-16:-8, :, 0]  # red and blue tied
    return rgb


def test_fast_paths_equal_the_plain_formulas_bit_for_bit():
    """Saturation by table, optical density by table, the median by rank filter and the hue only where
    it can fall in the pen range: the same values as the formulas they replace (tiles stay identical)."""
    from scipy import ndimage
    from skimage.color import rgb2hsv

    from histotransfer.wsi.tissue import median_filter

    rgb = _h_and_e_like((203, 157), seed=0)
    wide = rgb.astype(np.int32)
    cmax, cmin = wide.max(axis=2), wide.min(axis=2)
    plain_sat = np.zeros(cmax.shape, dtype=np.int32)
    np.divide((cmax - cmin) * 255, cmax, out=plain_sat, where=cmax > 0, casting="unsafe")
    assert np.array_equal(saturation(rgb), plain_sat.astype(np.uint8))
    plain_od = -np.log((rgb.astype(np.float32) + 1.0) / 256.0).mean(axis=2)
    assert np.array_equal(optical_density(rgb), plain_od)
    sat = saturation(rgb)
    for size in (3, 4, 5, 7):
        for threads in (1, 3):  # 203 rows: one band, or three of 67-68 rows
            plain = ndimage.median_filter(sat, size=size)
            assert np.array_equal(median_filter(sat, size, threads=threads), plain), (size, threads)
    for hue_range in ((60.0, 245.0), (10.0, 350.0), (200.0, 320.0)):  # inside and beyond red's sector
        hue = rgb2hsv(rgb)[..., 0] * 360.0
        plain = ((hue >= hue_range[0]) & (hue <= hue_range[1]) & (sat > 20)) | (
            (rgb.max(axis=2) < 90) & (sat < 80)
        )
        assert np.array_equal(pen_mask(rgb, hue_deg=hue_range, min_saturation=20), plain), hue_range
