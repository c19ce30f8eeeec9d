"""A gs:// cohort against a real GCS emulator (gcp-storage-emulator, in-process on 127.0.0.1)."""

import logging

import h5py
import numpy as np
import pytest

from histotransfer.core.config import TilingConfig
from histotransfer.io.manifest import read_manifest
from histotransfer.io.provenance import sha256_file
from histotransfer.io.storage import StorageError, fetch_gcs, gcs_client, parse_gcs_uri
from histotransfer.wsi.tiling import tile_cohort
from tests.helpers import BUCKET, free_port, write_csv


@pytest.fixture
def gcs(monkeypatch, tmp_path):
    from gcp_storage_emulator.server import create_server

    port = free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "histotransfer-test")
    monkeypatch.setenv("HISTOTRANSFER_CACHE", str(tmp_path / "cache"))
    yield gcs_client().bucket(BUCKET)
    for handler in logging.root.handlers[:]:  # main() logs to a capture stream that is gone by now
        logging.root.removeHandler(handler)
    server.stop()


def test_gs_slide_tiles_like_its_local_copy(gcs, sample_cohort, tmp_path):
    local = read_manifest(sample_cohort)[:2]
    rows = []
    for record in local:
        gcs.blob(f"cohort/{record.slide_id}.svs").upload_from_filename(record.path)
        rows.append(
            {
                "slide_id": record.slide_id,
                "path": f"gs://{BUCKET}/cohort/{record.slide_id}.svs",
                "label": record.label,
            }
        )
    remote = read_manifest(write_csv(tmp_path / "gs.csv", rows))
    tile_cohort(local, out_dir=tmp_path / "local", tiling=TilingConfig())
    result = tile_cohort(remote, out_dir=tmp_path / "remote", tiling=TilingConfig())
    assert not result.failed
    for record in local:
        with (
            h5py.File(tmp_path / "local" / f"{record.slide_id}.h5") as a,
            h5py.File(tmp_path / "remote" / f"{record.slide_id}.h5") as b,
        ):
            np.testing.assert_array_equal(a["coords"][:], b["coords"][:])
            np.testing.assert_array_equal(a["tissue_fraction"][:], b["tissue_fraction"][:])
            assert b.attrs["slide_path"].startswith("gs://")


def test_cache_is_content_addressed_and_verified(gcs, sample_cohort):
    record = read_manifest(sample_cohort)[0]
    blob = gcs.blob("x/slide.svs")
    blob.upload_from_filename(record.path)
    first = fetch_gcs(f"gs://{BUCKET}/x/slide.svs")
    assert sha256_file(first) == sha256_file(record.path)
    assert fetch_gcs(f"gs://{BUCKET}/x/slide.svs") == first  # cached: same entry
    blob.upload_from_string(b"new content")  # the object changed: a new cache entry
    second = fetch_gcs(f"gs://{BUCKET}/x/slide.svs")
    assert second != first
    assert second.read_bytes() == b"new content"
    assert first.is_file()  # the earlier version is not lost


def test_missing_object_fails_that_slide_only(gcs, sample_cohort, tmp_path):
    record = read_manifest(sample_cohort)[0]
    rows = [
        {"slide_id": "ok", "path": record.path, "label": "a"},
        {"slide_id": "gone", "path": f"gs://{BUCKET}/nope.svs", "label": "a"},
    ]
    result = tile_cohort(
        read_manifest(write_csv(tmp_path / "m.csv", rows)), out_dir=tmp_path / "t", tiling=TilingConfig()
    )
    assert [(o.slide_id, o.status) for o in result.outcomes] == [("ok", "done"), ("gone", "failed")]
    assert f"gs://{BUCKET}/nope.svs does not exist" in result.failed[0].reason


@pytest.mark.parametrize("uri", ["gs://", "gs://b", "gs://Bucket/x", "gs://bucket/dir/", "s3://bucket/x"])
def test_malformed_uris(uri):
    with pytest.raises(StorageError):
        parse_gcs_uri(uri)


def _objects(bucket, prefix: str) -> dict[str, bytes]:
    return {b.name[len(prefix) + 1 :]: b.download_as_bytes() for b in bucket.list_blobs(prefix=prefix)}


def test_cli_writes_outputs_to_gcs_byte_for_byte(gcs, sample_cohort, tmp_path, capsys):
    from histotransfer.cli import main
    from histotransfer.io.storage import COMPLETE_MARKER, is_complete, staging_dir

    uri = f"gs://{BUCKET}/studies/tiles"
    assert main(["tile", str(sample_cohort), "--out", uri]) == 0
    out = capsys.readouterr().out
    assert f"uploaded {uri}:" in out
    local = staging_dir(uri)
    files = {p.relative_to(local).as_posix(): p.read_bytes() for p in local.rglob("*") if p.is_file()}
    assert len([f for f in files if f.endswith(".h5")]) == 4
    remote = _objects(gcs, "studies/tiles")
    assert remote.pop(COMPLETE_MARKER)
    assert remote == files  # every byte of every file
    assert is_complete(uri)
    # a rerun uploads nothing new
    assert main(["tile", str(sample_cohort), "--out", uri]) == 0
    out = capsys.readouterr().out  # only summary.csv changed (statuses are now "skipped")
    assert "1 object(s) written, 8 already there" in out


def test_config_refuses_gs_output_dir_in_the_file(tmp_path):
    from histotransfer.core.config import ConfigError, load_config

    config = tmp_path / "c.yaml"
    config.write_text("output_dir: gs://bucket/study\n")
    with pytest.raises(ConfigError, match="--output-dir"):
        load_config(config)


def test_storage_failure_mid_upload_leaves_no_corrupt_object_and_a_rerun_completes(
    gcs, sample_cohort, tmp_path, monkeypatch, capsys
):
    from histotransfer.cli import main
    from histotransfer.io.storage import COMPLETE_MARKER, WRITING_MARKER, is_complete, staging_dir
    from tests.fault_proxy import FaultProxy

    emulator = int(gcs.client._connection.API_BASE_URL.rsplit(":", 1)[1])
    proxy = FaultProxy(emulator)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
    monkeypatch.setenv("HISTOTRANSFER_GCS_RETRY_S", "2")  # give up quickly
    uri = f"gs://{BUCKET}/faulty/tiles"
    proxy.fail_after = 3  # the 4th upload is cut mid-request, and the storage stays unreachable
    assert main(["tile", str(sample_cohort), "--out", uri]) == 2  # an unreachable bucket: exit 2
    err = capsys.readouterr().err
    assert f"upload to {uri} failed after retries" in err
    assert "rerun to resume" in err
    local = staging_dir(uri)
    proxy.heal()  # the storage is reachable again: look at what the failed run left
    remote = _objects(gcs, "faulty/tiles")
    assert 0 < len(remote) < len(list(local.rglob("*.h5"))) * 2 + 1
    assert COMPLETE_MARKER not in remote
    assert remote.pop(WRITING_MARKER)  # the objects of the upload that stopped are recognisably ours
    for name, data in remote.items():  # what arrived is whole
        assert (local / name).read_bytes() == data
    assert main(["tile", str(sample_cohort), "--out", uri]) == 0
    out = capsys.readouterr().out
    assert f"{len(remote)} already there" in out
    assert is_complete(uri)
    final = _objects(gcs, "faulty/tiles")
    final.pop(COMPLETE_MARKER)
    assert WRITING_MARKER not in final
    assert final == {p.relative_to(local).as_posix(): p.read_bytes() for p in local.rglob("*") if p.is_file()}
    proxy.close()


def test_cli_reads_a_gs_manifest_of_gs_slides(gcs, sample_cohort, tmp_path, capsys):
    from histotransfer.cli import main

    rows = []
    for record in read_manifest(sample_cohort)[:2]:
        gcs.blob(f"in/{record.slide_id}.svs").upload_from_filename(record.path)
        rows.append(
            {"slide_id": record.slide_id, "path": f"gs://{BUCKET}/in/{record.slide_id}.svs", "label": "x"}
        )
    gcs.blob("in/manifest.csv").upload_from_filename(str(write_csv(tmp_path / "m.csv", rows)))
    out = tmp_path / "tiles"
    assert main(["tile", f"gs://{BUCKET}/in/manifest.csv", "--out", str(out)]) == 0
    assert "2 of 2 slide(s) ready" in capsys.readouterr().out
    tile_cohort(read_manifest(sample_cohort)[:2], out_dir=tmp_path / "local", tiling=TilingConfig())
    for row in rows:
        with (
            h5py.File(out / f"{row['slide_id']}.h5") as a,
            h5py.File(tmp_path / "local" / f"{row['slide_id']}.h5") as b,
        ):
            np.testing.assert_array_equal(a["coords"][:], b["coords"][:])


def test_a_changing_tree_has_no_completion_marker_until_its_upload_finishes(gcs, tmp_path, monkeypatch):
    from google.api_core import exceptions as gexc
    from google.cloud.storage import Blob

    from histotransfer.io.storage import is_complete, upload_tree

    local = tmp_path / "tree"
    (local / "a").mkdir(parents=True)
    (local / "a" / "x.txt").write_text("one")
    (local / "y.txt").write_text("two")
    uri = f"gs://{BUCKET}/marker/tree"
    upload_tree(local, uri)
    assert is_complete(uri)
    assert upload_tree(local, uri) == {"uploaded": 0, "skipped": 2}
    assert is_complete(uri)  # nothing changed: still complete
    (local / "y.txt").write_text("changed")

    def storage_down(*args, **kwargs):
        raise gexc.Forbidden("storage refuses writes")

    with monkeypatch.context() as patch:
        patch.setattr(Blob, "upload_from_filename", storage_down)
        with pytest.raises(StorageError, match="rerun to resume"):
            upload_tree(local, uri)
    assert not is_complete(uri)  # half old, half new: not complete
    assert upload_tree(local, uri) == {"uploaded": 1, "skipped": 1}
    assert is_complete(uri)


def test_encoder_weights_from_a_bucket(gcs, tmp_path):
    """A pipeline on Kubernetes reads a published checkpoint from a bucket like a slide: a cached,
    verified download, then the same strict loading."""
    import torch

    from histotransfer.features.encoders import build_encoder
    from histotransfer.features.weights import WeightsError

    reference = build_encoder("resnet18@layer1+random", seed=3)
    torch.save(reference.module.model.state_dict(), tmp_path / "r18.pth")
    gcs.blob("models/r18.pth").upload_from_filename(str(tmp_path / "r18.pth"))
    encoder = build_encoder("resnet18@layer1+mine", weights=f"gs://{BUCKET}/models/r18.pth")
    assert encoder.weights_sha256 == reference.weights_sha256
    assert encoder.weights_source.startswith("file:r18.pth")
    with pytest.raises(WeightsError, match="does not exist"):
        build_encoder("resnet18@layer1+mine", weights=f"gs://{BUCKET}/models/missing.pth")


def test_an_output_root_holding_objects_we_did_not_write_is_refused_before_any_work(
    gcs, sample_cohort, tmp_path, capsys
):
    from histotransfer.cli import main
    from histotransfer.io.storage import staging_dir, upload_tree

    gcs.blob("shared/results/predictions.csv").upload_from_string("patient,score\nP1,0.9\n")
    uri = f"gs://{BUCKET}/shared/results"
    assert main(["tile", str(sample_cohort), "--out", uri]) == 2
    err = capsys.readouterr().err
    assert "holds objects histotransfer did not write (predictions.csv); nothing was changed" in err
    assert not staging_dir(uri).exists()  # refused before any work
    assert gcs.blob("shared/results/predictions.csv").download_as_bytes() == b"patient,score\nP1,0.9\n"
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "predictions.csv").write_text("ours")
    with pytest.raises(StorageError, match=r"did not write \(predictions.csv\)"):
        upload_tree(tmp_path / "tree", uri)  # nor by an upload, if it got that far
    assert gcs.blob("shared/results/predictions.csv").download_as_bytes() == b"patient,score\nP1,0.9\n"
