"""The MIL heads behind one interface (mil.aggregator): each pools any bag, is rebuilt from its saved
state alone, takes the folded standardisation, learns a planted-instance problem, and where it has its
own loss (CLAM's instance loss) computes it as the paper describes."""

import h5py
import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from histotransfer.core.config import EvaluationConfig, MILConfig, StudyConfig
from histotransfer.io.layout import MILLayout, StudyLayout
from histotransfer.mil.crossval import train_mil
from histotransfer.mil.model import (
    AGGREGATORS,
    CLAM_BAG_WEIGHT,
    MILOutput,
    build_head,
    head_kind,
    load_head,
)
from histotransfer.mil.results import MILResult
from histotransfer.mil.training import Standardizer, bag_loss
from histotransfer.report.html import aggregator_grid, write_report
from histotransfer.stages.train import train
from tests.helpers import synthetic_cohort, write_csv

ORDER_FREE = [k for k in AGGREGATORS if k != "transmil"]  # TransMIL's PPEG reads the tiles' order


def _head(kind: str, n_classes: int = 3, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return build_head(kind, 24, n_classes, **kwargs).eval()


@pytest.mark.parametrize("kind", AGGREGATORS)
@pytest.mark.parametrize("n", [1, 2, 3, 7, 50])
def test_every_head_pools_any_bag_into_logits_and_a_distribution_over_its_tiles(kind, n):
    model = _head(kind, patch_head=True)
    with torch.no_grad():
        out = model(torch.randn(n, 24))
    assert out.logits.shape == (3,)
    assert out.attention.shape == (n,)
    assert torch.isfinite(out.attention).all()
    assert (out.attention >= 0).all()
    torch.testing.assert_close(out.attention.sum(), torch.tensor(1.0))
    assert out.patch_logits.shape == (n, 3)


@pytest.mark.parametrize("kind", AGGREGATORS)
@pytest.mark.parametrize("patch_head", [False, True])
def test_a_saved_head_is_rebuilt_as_its_own_kind_and_computes_the_same(kind, patch_head):
    model = _head(kind, patch_head=patch_head, hidden_dims=(40, 16), dropout=0.2)
    state = model.state_dict()
    assert head_kind(state) == kind
    rebuilt = load_head(state)
    assert rebuilt.kind == kind
    assert not rebuilt.training
    x = torch.randn(19, 24)
    with torch.no_grad():
        a, b = model(x), rebuilt(x)
    torch.testing.assert_close(a.logits, b.logits)
    torch.testing.assert_close(a.attention, b.attention)
    if patch_head:
        torch.testing.assert_close(a.patch_logits, b.patch_logits)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        load_head(state | {"stray.weight": torch.zeros(1)})


def test_a_state_of_no_head_is_refused_by_name():
    with pytest.raises(ValueError, match="not a MIL head's state_dict"):
        head_kind({"fc.weight": torch.zeros(2, 2)})


@pytest.mark.parametrize("kind", ORDER_FREE)
def test_order_free_heads_ignore_the_order_of_tiles(kind):
    model = _head(kind)
    x = torch.randn(30, 24)
    order = torch.randperm(30)
    with torch.no_grad():
        a, b = model(x), model(x[order])
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.attention[order], b.attention, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", AGGREGATORS)
def test_the_standardisation_folds_into_every_heads_first_layer(kind):
    model = _head(kind)
    raw = [torch.randn(n, 24) * 5 + 3 for n in (10, 20)]
    scaler = Standardizer.fit(raw)
    x = torch.randn(13, 24) * 5 + 3
    with torch.no_grad():
        expected = model(scaler(x))
        folded = scaler.fold_into(model)(x)
    torch.testing.assert_close(folded.logits, expected.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(folded.attention, expected.attention, rtol=1e-4, atol=1e-6)


def test_mean_and_max_pool_the_tiles_logits_and_score_tiles_by_their_margin():
    x = torch.randn(11, 24)
    mean, top = _head("mean", 2), _head("max", 2)
    with torch.no_grad():
        tiles = mean.mean_classifier(mean.embed(x))  # (11, 2)
        torch.testing.assert_close(mean(x).logits, tiles.mean(0))
        margin = tiles[:, 1] - tiles.mean(1)
        torch.testing.assert_close(mean(x).attention, torch.softmax(margin, 0))
        tiles = top.tile_classifier(top.embed(x))
        out = top(x)
        best = int((tiles[:, 1] - tiles[:, 0]).argmax())
        torch.testing.assert_close(out.logits, tiles[best])  # the top tile's logits
        assert int(out.attention.argmax()) == best
    many = _head("max", 4)
    with torch.no_grad():
        tiles = many.tile_classifier(many.embed(x))
        probs = torch.softmax(tiles, 1)
        best = int(probs.max(1).values.argmax())  # the most confident tile, whatever its class
        torch.testing.assert_close(many(x).logits, tiles[best])


def test_clams_instance_loss_is_the_top_and_bottom_k_of_the_slides_class():
    model = _head("clam_sb", 3).train()
    x = torch.randn(30, 24)
    out = model(x)
    for label in range(3):
        weights = out.attention.detach().tolist()
        order = sorted(range(30), key=lambda i: -weights[i])  # a plain sort
        top, bottom = order[:8], order[-8:]
        logits = model.instance_classifiers[label](out.tiles[top + bottom])
        target = torch.tensor([1] * 8 + [0] * 8)
        expected = nn.functional.cross_entropy(logits, target)
        torch.testing.assert_close(model.auxiliary_loss(out, label), expected)
        slide = nn.functional.cross_entropy(out.logits[None], torch.tensor([label]))
        total = bag_loss(model, x, label, nn.CrossEntropyLoss(), beta=0.0)
        torch.testing.assert_close(total, CLAM_BAG_WEIGHT * slide + (1 - CLAM_BAG_WEIGHT) * expected)
    small = model(torch.randn(5, 24))  # k shrinks to half the bag: the top 2 and the bottom 2
    weights = small.attention.detach().tolist()
    order = sorted(range(5), key=lambda i: -weights[i])
    logits = model.instance_classifiers[0](small.tiles[order[:2] + order[-2:]])
    expected = nn.functional.cross_entropy(logits, torch.tensor([1, 1, 0, 0]))
    torch.testing.assert_close(model.auxiliary_loss(small, 0), expected)
    model.zero_grad()
    model.auxiliary_loss(model(x), 1).backward()  # the instance loss trains the embedding too
    assert model.embed[0].weight.grad.abs().sum() > 0
    assert model.auxiliary_loss(model(torch.randn(1, 24)), 0) is None  # one tile: nothing to contrast
    assert _head("abmil").auxiliary_loss(MILOutput(out.logits, out.attention, None), 0) is None


@pytest.mark.parametrize("n", [1, 3, 9, 10])
def test_transmil_is_its_layers_in_the_papers_order_over_tokens_padded_to_a_square(n):
    """A plain re-composition: repeat the first tokens up to a square, class token first, layer 1,
    the PPEG (x plus three depthwise convolutions over the square), layer 2, LayerNorm, the class token
    classified; attention: the class token's softmax over the real tiles in layer 2, mean over heads."""
    model = _head("transmil", 3)
    x = torch.randn(n, 24)
    with torch.no_grad():
        h = model.embed(x)
        side = int(np.ceil(np.sqrt(n)))
        tokens = torch.cat([model.cls_token, h, h.repeat(2, 1)[: side * side - n]])
        assert len(tokens) == 1 + side * side

        def attend(layer, t):
            q, k, v = layer.qkv(layer.norm(t)).chunk(3, dim=1)
            split = [z.reshape(len(t), 4, 16).transpose(0, 1) for z in (q, k, v)]  # (heads, n, 16)
            weights = torch.softmax(split[0] @ split[1].transpose(1, 2) / 4.0, dim=-1)
            mixed = (weights @ split[2]).transpose(0, 1).reshape(len(t), 64)
            return t + layer.out(mixed), weights[:, 0, 1:].mean(0)

        t, _ = attend(model.layer1, tokens)
        grid = t[1:].T.reshape(1, 64, side, side)
        grid = grid + sum(conv(grid) for conv in model.ppeg.convs)
        t = torch.cat([t[:1], grid.reshape(64, -1).T])
        t, cls = attend(model.layer2, t)
        logits = model.transmil_classifier(model.norm(t[0]))
        out = model(x)
    torch.testing.assert_close(out.logits, logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.attention, cls[:n] / cls[:n].sum(), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="not a multiple of 4 heads"):
        build_head("transmil", 24, 2, hidden_dims=(32, 18))


def test_mean_pooling_of_more_classes_scores_tiles_for_the_slides_class():
    model = _head("mean", 3)
    x = torch.randn(9, 24)
    with torch.no_grad():
        tiles = model.mean_classifier(model.embed(x))
        out = model(x)
    target = int(out.logits.argmax())
    torch.testing.assert_close(out.attention, torch.softmax(tiles[:, target] - tiles.mean(1), 0))


@pytest.mark.parametrize("kind", AGGREGATORS)
def test_every_head_trains_every_layer_it_uses(kind):
    model = _head(kind, 3, patch_head=True, dropout=0.1).train()
    x = torch.randn(12, 24)
    loss = bag_loss(model, x, 2, nn.CrossEntropyLoss(), beta=0.5)
    loss.backward()
    untouched = [
        name
        for name, p in model.named_parameters()
        if p.grad is None or not p.grad.abs().sum() > 0
        if not name.startswith(("instance_classifiers.0.", "instance_classifiers.1."))  # label 2's only
    ]
    assert untouched == []


@pytest.mark.parametrize("kind", AGGREGATORS)
def test_every_head_learns_planted_instances_and_points_at_them(kind, tmp_path):
    records, planted, features_dir = synthetic_cohort(tmp_path, n_bags=32)
    mil = MILConfig(aggregator=kind, epochs=10, folds=4, restarts=1)
    result = train_mil(
        records,
        features_dir=features_dir,
        out_dir=tmp_path / "mil",
        mil=mil,
        evaluation=EvaluationConfig(bootstrap=100, heatmaps=0),
    )
    # max pooling fits 24 training bags by a noise tile in about half its initialisations (measured
    # with a plain loop too): its floor is lower, and bench_mil.py says by how much on real features
    assert result.metrics["pooled"]["auc"]["value"] > (0.7 if kind == "max" else 0.9), kind
    hits = 0
    for slide_id, where in planted.items():
        with h5py.File(result.out_dir / "attention" / f"{slide_id}.h5") as f:
            hits += int(f["attention"][:].argmax()) in where
    assert hits / len(planted) >= (0.25 if kind == "max" else 0.5), (kind, hits)  # chance: 1 in 13
    state = torch.load(result.out_dir / "fold0" / "model.pt", weights_only=True)
    assert head_kind(state) == kind


def test_the_old_attention_key_names_its_new_one():
    with pytest.raises(ValidationError, match=r"renamed mil.aggregator .* write aggregator: gated"):
        MILConfig.model_validate({"attention": "gated"})
    assert MILConfig().aggregator == "abmil"


# ---- mil.compare: the encoder x aggregator axis -------------------------------------------------------


def test_compare_trains_each_other_head_inside_the_result_and_the_report_crosses_them(tmp_path):
    records, _, features_dir = synthetic_cohort(tmp_path, n_bags=16)
    manifest = write_csv(
        tmp_path / "manifest.csv",
        [
            {"slide_id": r.slide_id, "path": r.path, "label": r.label, "patient_id": r.patient_id}
            for r in records
        ],
    )
    layout = StudyLayout.of(manifest=manifest, features=features_dir.parent, mil=tmp_path / "mil")
    config = StudyConfig(mil={"epochs": 4, "folds": 2, "restarts": 1, "compare": ["mean", "max"]})
    result = train(layout, config, records, "synthetic")
    compared = {m.dir.parent.name: MILResult.load(m.dir) for m in MILLayout(result.out_dir).compared()}
    assert sorted(compared) == ["max", "mean"]
    for kind, other in compared.items():
        assert other.metrics["aggregator"] == kind
        assert other.out_dir == result.out_dir / "aggregators" / kind / "synthetic"
        assert head_kind(torch.load(other.out_dir / "fold0" / "model.pt", weights_only=True)) == kind
        assert [f["n_test"] for f in other.metrics["folds"]] == [f["n_test"] for f in result.metrics["folds"]]
    assert result.metrics["aggregator"] == "abmil"
    assert MILResult.load_all(layout.mil) == [MILResult.load(result.out_dir)]  # the primary only

    # one more head: the primary and the heads it had are reused, only the new one trains
    more = config.model_copy(
        update={"mil": config.mil.model_copy(update={"compare": ["mean", "max", "gated"]})}
    )
    again = train(layout, more, records, "synthetic")
    assert again.reused
    kinds = [m.dir.parent.name for m in MILLayout(again.out_dir).compared()]
    assert kinds == ["gated", "max", "mean"]

    encoders, heads, cells = aggregator_grid([again])
    assert encoders == ["synthetic"]
    assert heads == ["abmil", "gated", "mean", "max"]  # the catalogue's order
    page = write_report(
        [again], report_dir=tmp_path / "report", tiles_dir=tmp_path / "none", compared=[]
    ).read_text()
    assert "<h2>Encoder x aggregator</h2>" in page
    assert (tmp_path / "report" / "figures" / "aggregators.png").is_file()
    auc = cells[("synthetic", "max")].metrics["pooled"]["auc"]["value"]
    assert f"{auc:.3f}" in (tmp_path / "report" / "summary.md").read_text()


def test_compare_names_each_head_once():
    with pytest.raises(ValidationError, match=r"repeats a head \(mil.aggregator is abmil\)"):
        MILConfig(compare=["mean", "abmil"])
    with pytest.raises(ValidationError, match="repeats a head"):
        MILConfig(aggregator="mean", compare=["max", "max"])
    assert MILConfig(compare=["mean"]).head("mean") == MILConfig(aggregator="mean")


def test_results_trained_before_the_rename_keep_their_resume_hash():
    """The MIL settings hashed as they were when the key was mil.attention (paper | gated): a default
    result made then is still current, and mil.compare is in no result's hash."""
    from histotransfer.mil.crossval import _hashed_settings

    before = MILConfig().model_dump(mode="json", exclude={"bag_cache_gb", "aggregator", "compare"})
    assert _hashed_settings(MILConfig(compare=["mean"])) == before | {"attention": "paper"}
    assert _hashed_settings(MILConfig(aggregator="gated"))["attention"] == "gated"
    assert _hashed_settings(MILConfig(aggregator="mean"))["aggregator"] == "mean"
    assert "attention" not in _hashed_settings(MILConfig(aggregator="transmil"))
