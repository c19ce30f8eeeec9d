"""Attention top-k fine-tuning: selection, BatchNorm, head initialisation, learning (no leakage of the
test fold in a study: tests/integration/test_finetune_study.py)."""

import numpy as np
import openslide
import pytest
import torch
from torch import nn

from histotransfer.core.config import FinetuneConfig, TilingConfig
from histotransfer.core.encoder_ids import parse_encoder_id
from histotransfer.features.encoders import build_encoder
from histotransfer.finetune.tuning import Bag, EncoderWithHead, finetune, select_tiles
from histotransfer.io.manifest import read_manifest
from histotransfer.mil.model import AttentionMIL
from histotransfer.wsi.tiling import load_tiles, tile_cohort


def test_top_k_picks_exactly_the_highest_attention():
    attention = np.array([0.1, 0.5, 0.3, 0.9, 0.5, 0.05])
    assert select_tiles(attention, 3).tolist() == [3, 1, 4]  # ties keep tile order
    assert select_tiles(attention, 10).tolist() == [3, 1, 4, 2, 0, 5]
    random = select_tiles(attention, 3, mode="random", rng=np.random.default_rng(0))
    assert len(set(random.tolist())) == 3
    assert random.tolist() == select_tiles(attention, 3, mode="random", rng=np.random.default_rng(0)).tolist()
    with pytest.raises(ValueError, match="selection must be attention or random"):
        select_tiles(attention, 3, mode="best")


@pytest.mark.parametrize(
    ("frozen", "tuned"),
    [("resnet18@layer3", "resnet18@layer3+ft"), ("densenet121+kimianet", "densenet121+kimianet+ft")],
)
def test_finetuned_encoder_ids(frozen, tuned):
    from histotransfer.core.encoder_ids import finetuned_id, frozen_id
    from histotransfer.report.html import family

    assert finetuned_id(frozen) == tuned
    assert frozen_id(tuned) == frozen  # the way back, used to find a fine-tuned encoder's files
    assert frozen_id(frozen) is None
    assert parse_encoder_id(tuned).tag.endswith("ft")  # a valid id: it names folders and loads weights
    with pytest.raises(ValueError, match="already a fine-tuned id"):
        finetuned_id(tuned)
    assert family(parse_encoder_id(tuned)).startswith("fine-tuned")


def _bn_modules(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def test_batchnorm_stays_in_eval_mode_and_head_starts_from_mil_head():
    encoder = build_encoder("resnet18@layer1+random")
    head = AttentionMIL(encoder.dim, 2)
    model = EncoderWithHead.start(encoder, head).train()
    assert _bn_modules(model)
    assert all(not m.training for m in _bn_modules(model))
    assert model.head.embed.training  # everything else trains
    for key, value in head.state_dict().items():
        torch.testing.assert_close(model.head.state_dict()[key], value)
    assert model.head is not head  # a copy: the fold's MIL model is not modified


@pytest.fixture(scope="module")
def small_bags(sample_cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft-tiles")
    records = read_manifest(sample_cohort)
    tile_cohort(records, out_dir=out, tiling=TilingConfig())
    bags = []
    for r in records:
        tiles = load_tiles(out / f"{r.slide_id}.h5")
        idx = np.arange(4)
        subset = tiles.subset(idx)
        bags.append(Bag(r.slide_id, r.path, subset, int(r.label == "tumor"), np.zeros(4)))
    return bags


def _finetune_on_cpu(encoder, train_bags, val_bags, cfg):
    """Two-class fine-tuning on the CPU, the head a fresh attention-MIL head."""
    head = AttentionMIL(encoder.dim, 2)
    return finetune(encoder, head, train_bags, val_bags, n_classes=2, cfg=cfg, device=torch.device("cpu"))


@pytest.mark.slow
def test_finetuning_learns_and_keeps_batchnorm_statistics(small_bags):
    encoder = build_encoder("resnet18@layer1+random")
    torch.manual_seed(0)
    head = AttentionMIL(encoder.dim, 2)
    before = {k: v.clone() for k, v in encoder.module.model.state_dict().items()}
    cfg = FinetuneConfig(k=4, epochs=6, lr=1e-3, patience=None, augment=True)
    result = finetune(
        encoder, head, small_bags, small_bags[:2], n_classes=2, cfg=cfg, device=torch.device("cpu")
    )
    after = result.model.encoder.model.state_dict()
    for key, value in before.items():
        if "running_" in key or "num_batches_tracked" in key:
            torch.testing.assert_close(after[key], value, msg=key)  # BatchNorm statistics untouched
    assert not torch.equal(after["conv1.weight"], before["conv1.weight"])  # while weights train
    assert not torch.equal(after["bn1.weight"], before["bn1.weight"])  # affine parameters too
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < losses[0]
    assert result.best_epoch == int(np.argmin([h["val_loss"] for h in result.history])) + 1
    assert torch.equal(encoder.module.model.conv1.weight, before["conv1.weight"])  # the original is untouched


def test_top_k_tiles_are_read_once_and_augmented_per_tile(small_bags, monkeypatch):
    """Three epochs read each bag from its slide once; an augmented bag holds each tile turned and
    perhaps mirrored (never another tile's pixels), and the history reports tiles/s per epoch."""
    from histotransfer.finetune import tuning as training
    from histotransfer.wsi.tiling import read_tile

    reads = []
    real = training.read_bag
    monkeypatch.setattr(training, "read_bag", lambda bag, **kw: reads.append(bag.slide_id) or real(bag, **kw))
    encoder = build_encoder("resnet18@layer1+random")
    cfg = FinetuneConfig(k=4, epochs=3, lr=1e-3, patience=None)
    result = _finetune_on_cpu(encoder, small_bags, [], cfg)
    assert sorted(reads) == sorted(b.slide_id for b in small_bags)  # once each, for all three epochs
    assert all(h["tiles_per_s"] > 0 for h in result.history)
    assert result.read["tiles"] == 4 * len(small_bags)
    data = training.BagDataset(small_bags[:1], augment=True, seed=0)
    bag = small_bags[0]
    with openslide.OpenSlide(bag.slide_path) as slide:
        plain = [torch.from_numpy(read_tile(slide, bag.tiles, j)).permute(2, 0, 1) for j in range(4)]
    seen_turned = False
    for epoch in range(4):
        data.epoch = epoch
        tiles, _ = data[0]
        for j, tile in enumerate(tiles):
            variants = [torch.rot90(plain[j], r, dims=(1, 2)) for r in range(4)]
            variants += [v.flip(2) for v in variants]
            assert any(torch.equal(tile, v) for v in variants), (epoch, j)
            seen_turned |= not torch.equal(tile, plain[j])
    assert seen_turned
    assert torch.equal(data.tiles[0][0], plain[0])  # the decoded tiles themselves are never changed


def test_without_validation_bags_the_last_epoch_is_kept(small_bags):
    encoder = build_encoder("resnet18@layer1+random")
    torch.manual_seed(0)
    cfg = FinetuneConfig(k=4, epochs=3, lr=1e-3, patience=1)
    result = _finetune_on_cpu(encoder, small_bags, [], cfg)
    assert result.best_epoch == 3  # patience needs a validation loss: all epochs run
    assert [h["val_loss"] for h in result.history] == [None, None, None]


def test_freeze_blocks(small_bags):
    encoder = build_encoder("resnet18@layer2+random")
    cfg = FinetuneConfig(k=4, epochs=1, lr=1e-3, freeze_blocks=1, patience=None)
    result = _finetune_on_cpu(encoder, small_bags[:2], small_bags[2:], cfg)
    after = result.model.encoder.model
    torch.testing.assert_close(after.layer1[0].conv1.weight, encoder.module.model.layer1[0].conv1.weight)
    torch.testing.assert_close(after.conv1.weight, encoder.module.model.conv1.weight)
    assert not torch.equal(after.layer2[0].conv1.weight, encoder.module.model.layer2[0].conv1.weight)
