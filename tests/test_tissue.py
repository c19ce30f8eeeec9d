import numpy as np

from histotransfer.tissue import detect_tissue, saturation
from tests.conftest import synthetic_slide_rgb


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
