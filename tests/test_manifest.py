from pathlib import Path

import pytest

from histotransfer.manifest import ManifestError, check_slide_id, read_manifest
from tests.helpers import write_csv


@pytest.fixture
def slide_file(tmp_path) -> Path:
    path = tmp_path / "slides" / "a.svs"
    path.parent.mkdir()
    path.write_bytes(b"not read by the manifest check")
    return path


def test_valid_manifest_resolves_relative_paths_and_defaults(tmp_path, slide_file):
    manifest = write_csv(
        tmp_path / "m.csv",
        [
            {"slide_id": "a", "path": "slides/a.svs", "label": "tumor", "mpp": "", "split": "", "extra": "x"},
            {
                "slide_id": "b",
                "path": "gs://bucket/dir/b.svs",
                "label": "normal",
                "mpp": "0.25",
                "split": "TEST",
            },
        ],
    )
    a, b = read_manifest(manifest)
    assert a.path == str(slide_file.resolve())
    assert (a.patient_id, a.mpp, a.split, a.line) == ("a", None, None, 2)
    assert (b.path, b.mpp, b.split, b.line) == ("gs://bucket/dir/b.svs", 0.25, "test", 3)


def test_missing_columns_named(tmp_path):
    manifest = write_csv(tmp_path / "m.csv", [{"slide": "a", "path": "x"}])
    with pytest.raises(ManifestError, match=r"lacks required column\(s\) slide_id, label; found slide, path"):
        read_manifest(manifest)


def test_every_problem_reported_with_its_line(tmp_path, slide_file):
    rows = [
        {"slide_id": "a", "path": str(slide_file), "label": "t"},  # line 2: fine
        {"slide_id": "a", "path": str(slide_file), "label": "t"},  # 3: duplicate
        {"slide_id": "../etc", "path": str(slide_file), "label": "t"},  # 4: unsafe
        {"slide_id": "c", "path": "missing.svs", "label": "t"},  # 5: missing file
        {"slide_id": "d", "path": str(slide_file), "label": " "},  # 6: empty label
        {"slide_id": "e", "path": str(slide_file), "label": "t", "mpp": "-1"},  # 7: bad mpp
        {"slide_id": "f", "path": str(slide_file), "label": "t", "split": "holdout"},  # 8
        {"slide_id": "g", "path": "gs://b/", "label": "t"},  # 9: malformed URI
        {"slide_id": "h", "path": "", "label": "t"},  # 10: empty path
    ]
    with pytest.raises(ManifestError) as info:
        read_manifest(write_csv(tmp_path / "m.csv", rows))
    message = str(info.value)
    assert "has 8 problem(s)" in message
    for line, text in [
        (3, "slide_id 'a' duplicates line 2"),
        (4, "slide_id '../etc' is unsafe"),
        (5, "slide file 'missing.svs' not found"),
        (6, "label is empty"),
        (7, "mpp '-1' is not a positive number"),
        (8, "split 'holdout' is not one of train, val, test"),
        (9, "malformed GCS URI 'gs://b/'"),
        (10, "path is empty"),
    ]:
        assert f"line {line}: {text}" in message
    assert "line 2:" not in message


@pytest.mark.parametrize("bad", ["", "a/b", "a\\b", "..", ".hidden", "a b", "ü", "x:y", "/abs"])
def test_unsafe_slide_ids(bad):
    assert check_slide_id(bad) is not None


@pytest.mark.parametrize("good", ["TCGA-AA-3510-01Z-00-DX1.5f0d2e", "slide_1", "a.b-c", "0"])
def test_safe_slide_ids(good):
    assert check_slide_id(good) is None


def test_empty_manifest_is_an_error(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("slide_id,path,label\n")
    with pytest.raises(ManifestError, match="lists no slides"):
        read_manifest(path)


def test_missing_manifest_is_an_error(tmp_path):
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(tmp_path / "nope.csv")
