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
