"""The bundle's checks without a study: a checkpoint that is not an attention-MIL head is refused, the
fold to export is chosen by validation else training loss, a corrupt, mismatched or incomplete bundle is
a clear error. ONNX parity: tests/contract/test_onnx_parity.py; export and the torch-free predict on a
study: tests/integration/test_export_study.py."""

import json
import shutil

import pytest
import torch

from histotransfer.cli import EXIT_BAD_INPUT, main
from histotransfer.core.errors import BundleError
from histotransfer.deploy.bundle import BUNDLE_FILE, ENCODER_FILE, load_bundle
from histotransfer.deploy.packaging import choose_fold
from histotransfer.io.provenance import sealed_json
from histotransfer.mil.model import AttentionMIL


def test_from_state_dict_rejects_other_checkpoints():
    with pytest.raises(ValueError, match="not an attention-MIL state_dict"):
        AttentionMIL.from_state_dict({"fc.weight": torch.zeros(2, 2)})


@pytest.mark.parametrize(
    ("losses", "fold"),
    [
        ([(0.3, 0.10), (0.2, 0.50), (0.4, 0.01)], 1),  # validation losses decide when there are any
        ([(None, 0.10), (None, 0.05), (None, 0.30)], 1),  # else the kept epoch's training loss
        ([(None, 0.05), (None, 0.05)], 0),  # ties: the lower fold
    ],
)
def test_choose_fold_by_validation_else_training_loss(tmp_path, losses, fold):
    for k, (val, train) in enumerate(losses):
        history = [{"epoch": 1, "train_loss": 9.0, "val_loss": None if val is None else 9.0}]
        history.append({"epoch": 2, "train_loss": train, "val_loss": val})
        (tmp_path / f"fold{k}").mkdir()
        (tmp_path / f"fold{k}" / "history.json").write_text(
            sealed_json({"best_epoch": 2, "history": history})
        )
    chosen, loss = choose_fold(tmp_path)
    assert chosen == fold
    assert (loss.val_loss, loss.train_loss) == losses[fold]


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    return copy


def test_corrupt_bundle_is_a_clear_error(bundle_copy, capsys):
    load_bundle(bundle_copy)  # intact
    data = (bundle_copy / ENCODER_FILE).read_bytes()
    (bundle_copy / ENCODER_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match=r"encoder.onnx does not match bundle.json .*corrupt"):
        load_bundle(bundle_copy)
    rc = main(["predict", "x.svs", "--bundle", str(bundle_copy), "--out", str(bundle_copy.parent / "o")])
    assert rc == EXIT_BAD_INPUT
    assert "corrupt" in capsys.readouterr().err


def test_mismatched_or_incomplete_bundle_is_a_clear_error(bundle_copy, tmp_path):
    """bundle.json is checked against itself (any edit: test_lineage) and, sealed again as a buggy tool
    might write it, against the files it describes."""
    from histotransfer.deploy.bundle import BUNDLE_VERSION

    def write(spec: dict) -> None:
        (bundle_copy / BUNDLE_FILE).write_text(sealed_json(spec))

    spec = json.loads((bundle_copy / BUNDLE_FILE).read_text())
    spec["encoder"]["dim"] = 7  # bundle.json no longer describes these files
    write(spec)
    with pytest.raises(BundleError, match=r"output `features` has shape .*do not belong together"):
        load_bundle(bundle_copy)
    spec["format_version"] = 99
    write(spec)
    with pytest.raises(BundleError, match="format_version 99"):
        load_bundle(bundle_copy)
    del spec["classes"]
    spec["format_version"] = BUNDLE_VERSION
    write(spec)
    with pytest.raises(BundleError, match="`classes`: Field required"):
        load_bundle(bundle_copy)
    (bundle_copy / BUNDLE_FILE).unlink()
    with pytest.raises(BundleError, match="not a finished bundle"):
        load_bundle(bundle_copy)
    with pytest.raises(BundleError, match="no bundle folder"):
        load_bundle(tmp_path / "nothing")
