"""CKA: the mathematics (Kornblith et al. 2019; Nguyen, Raghu & Kornblith 2021) and layer extraction."""

import numpy as np
import pytest

from histotransfer import cka

RNG = np.random.default_rng(0)
X = RNG.normal(size=(300, 40))
Y = X @ RNG.normal(size=(40, 25)) + 2.0 * RNG.normal(size=(300, 25))


def _orthogonal(d: int, seed: int = 1) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q


@pytest.mark.parametrize("measure", [cka.linear, cka.rbf])
def test_self_similarity_is_one(measure):
    assert measure(X, X) == pytest.approx(1.0, abs=1e-10)


@pytest.mark.parametrize("measure", [cka.linear, cka.rbf])
def test_symmetry(measure):
    assert measure(X, Y) == pytest.approx(measure(Y, X), abs=1e-12)


@pytest.mark.parametrize("measure", [cka.linear, cka.rbf])
def test_invariant_to_orthogonal_transforms_and_isotropic_scaling(measure):
    reference = measure(X, Y)
    assert measure(X @ _orthogonal(40), Y) == pytest.approx(reference, abs=1e-9)
    assert measure(X, Y @ _orthogonal(25, seed=2)) == pytest.approx(reference, abs=1e-9)
    assert measure(7.5 * X, Y) == pytest.approx(reference, abs=1e-9)
    assert measure(X, 0.01 * Y) == pytest.approx(reference, abs=1e-9)


def test_linear_cka_is_not_invariant_to_general_invertible_maps():
    a = np.random.default_rng(3).normal(size=(40, 40)) @ np.diag(np.logspace(0, 2, 40))
    assert np.linalg.matrix_rank(a) == 40
    assert abs(cka.linear(X @ a, Y) - cka.linear(X, Y)) > 0.01


def test_linear_agrees_with_a_direct_hsic_computation():
    n = len(X)
    h = np.eye(n) - np.ones((n, n)) / n

    def hsic(k, l):  # noqa: E741
        return np.trace(k @ h @ l @ h) / (n - 1) ** 2

    k, l = X @ X.T, Y @ Y.T  # noqa: E741
    direct = hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l))
    assert cka.linear(X, Y) == pytest.approx(direct, rel=1e-10)
    assert cka.linear(X.astype(np.float32), Y.astype(np.float32)) == pytest.approx(direct, rel=1e-6)


def test_rbf_uses_the_median_distance_when_no_sigma_is_given():
    sigma = cka.median_sigma(X)
    assert cka.rbf(X, Y) != pytest.approx(cka.rbf(X, Y, sigma=sigma / 10))
    xs = X[:4]
    d = np.sqrt(((xs[:, None] - xs[None]) ** 2).sum(-1))[np.triu_indices(4, 1)]
    assert cka.median_sigma(xs) == pytest.approx(np.median(d))


def test_minibatch_estimator_converges_to_the_full_value():
    rng = np.random.default_rng(5)
    errors = []
    for n in (512, 4096, 32768):
        x = rng.normal(size=(n, 32))
        y = np.tanh(x @ rng.normal(size=(32, 16))) + 0.5 * rng.normal(size=(n, 16))
        errors.append(abs(cka.minibatch_linear(x, y, batch_size=256) - cka.linear(x, y)))
    assert errors[-1] < errors[0]
    assert errors[-1] < 0.01


def test_minibatch_matrix_and_its_checks():
    estimator = cka.MinibatchCKA(2, 1)
    for start in range(0, 300, 100):
        estimator.update([X[start : start + 100], Y[start : start + 100]], [X[start : start + 100]])
    matrix = estimator.value()
    assert matrix.shape == (2, 1)
    assert matrix[0, 0] == pytest.approx(1.0)
    assert estimator.examples == 300
    with pytest.raises(ValueError, match="same batch of examples"):
        estimator.update([X[:10], Y[:12]], [X[:10]])
    with pytest.raises(ValueError, match="at least 4 examples"):
        cka.unbiased_hsic(np.eye(3), np.eye(3))
    with pytest.raises(ValueError, match="same examples"):
        cka.linear(X, Y[:10])


@pytest.mark.slow
def test_layer_activations_are_the_named_blocks_in_order(sample_cohort, tmp_path):
    from histotransfer.cka.layers import layer_cka, sample_tiles, write_cka
    from histotransfer.core.config import TilingConfig
    from histotransfer.features.encoders import build_encoder
    from histotransfer.io.manifest import read_manifest
    from histotransfer.wsi.tiling import tile_cohort

    records = read_manifest(sample_cohort)[:2]
    tile_cohort(records, out_dir=tmp_path / "tiles", tiling=TilingConfig())
    tiles = sample_tiles(records, tmp_path / "tiles", n_tiles=24, seed=0)
    assert len(tiles) == 24
    a = build_encoder("resnet18@layer3+random")
    b = build_encoder("resnet18@layer3+random", seed=1)
    same = layer_cka(a, a, tiles, batch_size=8, device="cpu")
    assert same.layers_a == ["layer1", "layer2", "layer3"]
    np.testing.assert_allclose(np.diag(same.matrix), 1.0, atol=1e-9)
    other = layer_cka(a, b, tiles, batch_size=8, device="cpu")
    assert other.matrix.shape == (3, 3)
    assert other.n_examples == 24
    assert not np.allclose(np.diag(other.matrix), 1.0)
    json_path, png_path = write_cka(
        tmp_path / "cka" / "a__b.json", tmp_path / "cka" / "a__b.png", "a", "b", other
    )
    assert json_path.name == "a__b.json"
    assert png_path.stat().st_size > 1000
