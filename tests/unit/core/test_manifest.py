from pathlib import Path

import pytest

from histotransfer.io.manifest import ManifestError, check_slide_id, read_manifest
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


def slides(folder: Path, n: int) -> list[str]:
    """``n`` distinct slide files (the manifest check reads none of them)."""
    folder.mkdir(exist_ok=True)
    for i in range(n):
        (folder / f"s{i}.svs").write_bytes(b"slide %d" % i)
    return [str(folder / f"s{i}.svs") for i in range(n)]


def test_every_problem_reported_with_its_line(tmp_path, slide_file):
    s = slides(tmp_path / "many", 6)
    rows = [
        {"slide_id": "a", "path": str(slide_file), "label": "t"},  # line 2: fine
        {"slide_id": "a", "path": str(slide_file), "label": "t"},  # 3: duplicate
        {"slide_id": "../etc", "path": s[1], "label": "t"},  # 4: unsafe
        {"slide_id": "c", "path": "missing.svs", "label": "t"},  # 5: missing file
        {"slide_id": "d", "path": s[2], "label": " "},  # 6: empty label
        {"slide_id": "e", "path": s[3], "label": "t", "mpp": "-1"},  # 7: bad mpp
        {"slide_id": "f", "path": s[4], "label": "t", "split": "holdout"},  # 8
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
        (7, "mpp '-1' is outside 0.01 to 100 microns per pixel"),
        (8, "split 'holdout' is not one of train, val, test"),
        (9, "malformed GCS URI 'gs://b/'"),
        (10, "path is empty"),
    ]:
        assert f"line {line}: {text}" in message
    assert "line 2:" not in message


@pytest.mark.parametrize("bad", ["", "a/b", "a\\b", "..", ".hidden", "a b", "ü", "x:y", "/abs", "x" * 201])
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


# ---- CSV that does not parse: the line where the bad row starts, and what to check ------------------

HEADER = "slide_id,path,label\n"


@pytest.mark.parametrize(
    ("body", "line", "message"),
    [
        # a stray quote swallows the rest of a long file: over csv's field size limit
        ('a,s0.svs,t\nb,"s1.svs,t\n' + "c,s2.svs,t\n" * 20_000, 3, "field larger than field limit"),
        ('a,s0.svs,t\nb,"s1.svs,t\nc,s2.svs,t\n', 3, "unexpected end of data"),  # never closed
        ('a,s0.svs,t\nb,"s1"x.svs,t\n', 3, "',' expected after '\"'"),  # text after a closing quote
        ('\n\na,s0.svs,t\nb,s1.svs,"t\n', 5, "unexpected end of data"),  # blank lines still count
    ],
)
def test_a_csv_error_names_the_line_where_its_row_starts(tmp_path, body, line, message):
    slides(tmp_path, 3)
    manifest = tmp_path / "m.csv"
    manifest.write_text(HEADER + body)
    with pytest.raises(ManifestError) as info:
        read_manifest(manifest)
    text = str(info.value)
    assert f"manifest {manifest} line {line}: cannot be read as CSV" in text
    assert message in text
    assert "check its quoting" in text
    assert len(text) < 1000  # the swallowed lines are not echoed


def test_a_quoted_field_spanning_lines_is_a_problem_of_its_row(tmp_path):
    s = slides(tmp_path, 3)
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        HEADER + f'a,{s[0]},"tumor\n"\nb,{s[1]},normal,"a note\nover two lines"\nc,"{s[2]}\nx",t\n'
    )
    with pytest.raises(ManifestError) as info:
        read_manifest(manifest)
    text = str(info.value)
    assert "has 4 problem(s)" in text
    assert "line 2: label spans lines 2 to 3 (a line break inside quotes); check its quoting" in text
    assert "line 4: has 4 fields but the header names 3" in text  # the note is an extra field
    assert "line 6: path spans lines 6 to 7" in text  # line numbers follow the file, not the rows
    assert "line 6: slide file" in text
    assert "not found" in text


def test_line_numbers_count_blank_lines_and_multi_line_fields(tmp_path):
    s = slides(tmp_path, 2)
    manifest = tmp_path / "m.csv"
    manifest.write_text(f'slide_id,path,label,notes\n\na,{s[0]},t,"x\ny"\n\nb,{s[1]},t,\n')
    a, b = read_manifest(manifest)
    assert (a.line, b.line) == (3, 6)


def test_a_column_named_twice_is_an_error(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("slide_id,path,label,label\na,x.svs,t,u\n")
    with pytest.raises(ManifestError, match=r"line 1: the header names column\(s\) label twice"):
        read_manifest(manifest)


# ---- slide files: loops, unreadable paths, one file under two ids -----------------------------------


def _loop(d: Path) -> None:
    (d / "x.svs").symlink_to(d / "y.svs")
    (d / "y.svs").symlink_to(d / "x.svs")


@pytest.mark.parametrize(
    ("make", "path", "message"),
    [
        (lambda d: (d / "loop.svs").symlink_to(d / "loop.svs"), "loop.svs", "a symbolic link that loops"),
        (_loop, "x.svs", "is a symbolic link that loops back to itself"),
        (lambda d: (d / "folder.svs").mkdir(), "folder.svs", "is not a file"),
        (lambda d: (d / "plain").write_text("x"), "plain/s.svs", "not found"),  # a file as a folder
        (None, "x" * 300 + ".svs", "cannot be read (File name too long)"),
        (None, "a\x00b.svs", "contains a NUL character"),
        (None, "~no-such-user-histotransfer/s.svs", "no home folder for its '~'"),
    ],
    ids=["self-loop", "two-link loop", "folder", "file as folder", "name too long", "NUL", "unknown user"],
)
def test_a_slide_path_that_cannot_be_used_is_a_line_problem(tmp_path, make, path, message):
    if make is not None:
        make(tmp_path)
    good = slides(tmp_path / "ok", 1)[0]
    rows = [{"slide_id": "good", "path": good, "label": "t"}, {"slide_id": "bad", "path": path, "label": "t"}]
    manifest = write_csv(tmp_path / "m.csv", rows)
    with pytest.raises(ManifestError) as info:
        read_manifest(manifest)
    text = str(info.value)
    assert "has 1 problem(s)" in text
    assert f"{manifest} line 3: " in text
    assert message in text


def test_an_unreadable_slide_is_a_line_problem(tmp_path, slide_file, monkeypatch):
    import os

    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p).endswith("a.svs") else real(p, mode))
    manifest = write_csv(tmp_path / "m.csv", [{"slide_id": "a", "path": "slides/a.svs", "label": "t"}])
    with pytest.raises(ManifestError, match=r"line 2: slide file 'slides/a.svs' cannot be read \(permission"):
        read_manifest(manifest)


def test_one_slide_file_under_two_ids_names_both_lines(tmp_path, slide_file):
    (tmp_path / "link.svs").symlink_to(slide_file)
    os_link = tmp_path / "hard.svs"
    os_link.hardlink_to(slide_file)
    other = slides(tmp_path / "other", 1)[0]
    rows = [
        {"slide_id": "a", "path": "slides/a.svs", "label": "t"},  # line 2
        {"slide_id": "b", "path": other, "label": "t"},  # 3: another file
        {"slide_id": "c", "path": str(tmp_path / "link.svs"), "label": "t"},  # 4: a symbolic link to a
        {"slide_id": "d", "path": str(os_link), "label": "t"},  # 5: a hard link to a
        {"slide_id": "e", "path": "gs://bucket/x.svs", "label": "t"},  # 6
        {"slide_id": "f", "path": "gs://bucket/x.svs", "label": "t"},  # 7: the same object
        {"slide_id": "g", "path": "gs://bucket/y.svs", "label": "t"},  # 8
    ]
    with pytest.raises(ManifestError) as info:
        read_manifest(write_csv(tmp_path / "m.csv", rows))
    text = str(info.value)
    assert "has 3 problem(s)" in text
    for line, first, ids in [(4, 2, "'a' and 'c'"), (5, 2, "'a' and 'd'"), (7, 6, "'e' and 'f'")]:
        assert f"line {line}: lines {first} and {line} list the same slide file" in text
        assert f"(as {ids}); one slide must have one id (a copy under two ids would be trained on" in text


def test_a_slide_id_given_twice_is_not_also_a_second_file_problem(tmp_path, slide_file):
    rows = [{"slide_id": "a", "path": str(slide_file), "label": "t"}] * 2
    with pytest.raises(ManifestError) as info:
        read_manifest(write_csv(tmp_path / "m.csv", rows))
    assert "has 1 problem(s)" in str(info.value)
    assert "slide_id 'a' duplicates line 2" in str(info.value)


# ---- labels spelled two ways ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("labels", "listed"),
    [
        (["Tumor", "tumor", "normal"], "labels 'Tumor' (line 2), 'tumor' (line 3) differ only in case"),
        (["tumor", "tu mor", "normal"], "labels 'tumor' (line 2), 'tu mor' (line 3)"),
        (["TUMOR", "normal", "Tumor", "TUMOR"], "labels 'TUMOR' (lines 2, 5), 'Tumor' (line 4)"),
        (["tumor", "tumor\u00a0", "normal"], None),  # a no-break space is stripped like a space
        (["ｔｕｍｏｒ", "tumor", "normal"], "labels 'ｔｕｍｏｒ' (line 2), 'tumor' (line 3)"),  # full width
        (["normal", "Normal", "tumor", "TUMOR"], "labels 'tumor' (line 4), 'TUMOR' (line 5)"),
    ],
)
def test_labels_that_differ_only_in_case_or_spacing(tmp_path, labels, listed):
    s = slides(tmp_path, len(labels))
    rows = [
        {"slide_id": f"s{i}", "path": p, "label": lab}
        for i, (p, lab) in enumerate(zip(s, labels, strict=True))
    ]
    manifest = write_csv(tmp_path / "m.csv", rows)
    if listed is None:
        assert {r.label for r in read_manifest(manifest)} == {"tumor", "normal"}
        return
    with pytest.raises(ManifestError) as info:
        read_manifest(manifest)
    assert listed in str(info.value)
    assert "spell each class one way" in str(info.value)


def test_labels_of_slides_to_classify_are_not_compared(tmp_path):
    s = slides(tmp_path, 2)
    rows = [
        {"slide_id": "a", "path": s[0], "label": "Tumor"},
        {"slide_id": "b", "path": s[1], "label": "tumor"},
    ]
    assert len(read_manifest(write_csv(tmp_path / "m.csv", rows), labels=False)) == 2


# ---- mpp, and the length of what a message echoes ---------------------------------------------------


@pytest.mark.parametrize(
    ("mpp", "ok"),
    [
        ("0.25", True),
        ("0.01", True),
        ("100", True),
        ("1e-3", False),
        ("352.8", False),  # 72 dpi: an image tool's default, not a scanner's
        ("0", False),
        ("-0.5", False),
        ("nan", False),
        ("inf", False),
        ("1e400", False),
        ("0,25", False),
        ("0.25um", False),
    ],
)
def test_manifest_mpp_must_be_a_plausible_resolution(tmp_path, slide_file, mpp, ok):
    manifest = write_csv(
        tmp_path / "m.csv", [{"slide_id": "a", "path": str(slide_file), "label": "t", "mpp": mpp}]
    )
    if ok:
        assert read_manifest(manifest)[0].mpp == float(mpp)
        return
    with pytest.raises(ManifestError, match=r"line 2: mpp '.*' is (outside 0.01 to 100|not a number)"):
        read_manifest(manifest)


def test_messages_echo_long_values_short_and_list_at_most_50_problems(tmp_path):
    rows = [{"slide_id": "x" * 100_000, "path": "p" * 100_000, "label": "t"}] + [
        {"slide_id": f"s{i}", "path": f"missing-{i}.svs", "label": "t"} for i in range(200)
    ]
    with pytest.raises(ManifestError) as info:
        read_manifest(write_csv(tmp_path / "m.csv", rows))
    text = str(info.value)
    assert "has 202 problem(s)" in text  # a long id and a long path on line 2, then 200 missing files
    assert "... and 152 more" in text
    assert "has 100,000 characters: at most 200" in text
    assert len(text) < 20_000
