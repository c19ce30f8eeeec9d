"""The exit-status contract (histotransfer.cli's docstring) under generated input: malformed manifests,
configs of random YAML, numbers for numeric flags. Whatever a command that validates before work is
given, it ends in 0, 1 or 2, never in a traceback or 70, and changes nothing outside its output folder.

The commands run in-process. Inputs that pass validation reach cheap work only: "slides" that are a
few bytes (each fails on its own: status 1) and a features folder that does not exist (status 2).
"""

from __future__ import annotations

import hashlib
import shutil
import string
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from histotransfer.cli import EXIT_BAD_INPUT, EXIT_OK, EXIT_SLIDES_FAILED, main

SETTINGS = settings(
    max_examples=40,
    deadline=None,
    database=None,  # nothing written into the repository
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@dataclass(frozen=True)
class Inputs:
    root: Path  # everything a command may read; no command may change it
    slides: list[Path]  # small files that are no slides
    manifest: Path  # a valid manifest of them
    bundle: Path  # a small ONNX bundle
    features: Path  # a features folder that does not exist (FEATURES/ENCODER_ID)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_bundle) -> Inputs:
    root = tmp_path_factory.mktemp("inputs")
    slides = []
    for name in ("a.svs", "b.svs", "c.tiff"):
        (root / name).write_bytes(f"not a slide: {name}".encode())
        slides.append(root / name)
    (root / "folder.svs").mkdir()
    (root / "loop.svs").symlink_to(root / "loop.svs")
    (root / "link.svs").symlink_to(root / "a.svs")
    manifest = root / "manifest.csv"
    manifest.write_text("slide_id,path,label\na,a.svs,tumor\nb,b.svs,normal\n")
    bundle = shutil.copytree(tiny_bundle, root / "bundle")
    return Inputs(root, slides, manifest, bundle, root / "features" / "resnet18+random")


def _state(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "-"
        for p in sorted(folder.rglob("*"))
        if not p.is_symlink()
    }


@contextmanager
def _work(inputs: Inputs) -> Iterator[Path]:
    """A folder for one example's own files and output, outside the inputs."""
    with tempfile.TemporaryDirectory(prefix="prop-") as folder:
        yield Path(folder)


def holds_the_contract(inputs: Inputs, argv: list[str], capsys) -> int:
    """Run ``argv``; assert the contract; return the exit status."""
    capsys.readouterr()
    before = _state(inputs.root)
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code
    err = capsys.readouterr().err
    assert code in (EXIT_OK, EXIT_SLIDES_FAILED, EXIT_BAD_INPUT), (argv, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    assert "internal error" not in err, err[-3000:]
    if code == EXIT_BAD_INPUT and "usage:" not in err:
        assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1, err[-3000:]
    assert _state(inputs.root) == before  # nothing outside the output folder changed
    assert not list(inputs.root.rglob("*.partial"))
    return code


# ---- manifests --------------------------------------------------------------------------------------

IDS = st.one_of(
    st.sampled_from(["a", "b", "a", "slide-1", "../x", "", " a ", "a b", ".h", "x" * 250, "é"]),
    st.text(string.ascii_letters + string.digits + "-_.", min_size=1, max_size=8),
)
PATHS = st.sampled_from(
    [
        "a.svs",
        "b.svs",
        "c.tiff",
        "link.svs",  # a.svs under another name
        "./a.svs",
        "missing.svs",
        "folder.svs",
        "loop.svs",
        "a.svs/x",
        "",
        "~no-such-user-histotransfer/a.svs",
        "x" * 300,
        "gs://",
        "gs://bucket/",
        "gs://bucket/x.svs",
        "\x00",
    ]
)
LABELS = st.one_of(
    st.sampled_from(["tumor", "Tumor", "TUMOR", "tu mor", "normal", "Normal ", "", " ", "tumör"]),
    st.text(max_size=6),
)
MPPS = st.sampled_from(["", "0.25", "0.5", "100", "100.1", "0", "-1", "nan", "inf", "1e400", "0,5", "x"])
SPLITS = st.sampled_from(["", "train", "val", "test", "TEST", "holdout"])
QUOTING = st.sampled_from(
    [
        lambda v: v,
        lambda v: f'"{v}"',
        lambda v: f'"{v}',  # a quote that is never closed
        lambda v: f'{v}"',
        lambda v: f'"{v}"x',  # text after the closing quote
        lambda v: f'"{v}\n"',  # a line break inside quotes
        lambda v: f"{v},extra",  # a comma outside quotes
    ]
)


@st.composite
def manifests(draw) -> bytes:
    """A manifest: mostly rows of plausible and broken values, quoted or not; sometimes raw bytes."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=200))
    columns = draw(
        st.sampled_from(
            [
                ["slide_id", "path", "label"],
                ["slide_id", "path", "label", "mpp", "split", "patient_id"],
                ["path", "label", "slide_id", "notes"],
                ["slide_id", "path"],  # no label
                ["slide_id", "path", "label", "label"],
                ["Slide_ID", "path", "label"],
            ]
        )
    )
    values = {"slide_id": IDS, "path": PATHS, "label": LABELS, "mpp": MPPS, "split": SPLITS}
    lines = [",".join(columns)]
    for _ in range(draw(st.integers(0, 6))):
        fields = [draw(values.get(c, st.text(max_size=5))) for c in columns]
        quote = draw(st.lists(QUOTING, min_size=len(fields), max_size=len(fields)))
        lines.append(",".join(q(f) for q, f in zip(quote, fields, strict=True)))
    text = "\n".join(lines) + draw(st.sampled_from(["\n", "", "\n\n", "\r\n"]))
    return text.encode(draw(st.sampled_from(["utf-8", "utf-8-sig", "latin-1"])), errors="replace")


@SETTINGS
@given(data=manifests())
def test_any_manifest_ends_in_the_contract(inputs, capsys, data):
    with _work(inputs) as work:
        manifest = inputs.root / "generated.csv"  # beside the slides its relative paths name
        manifest.write_bytes(data)
        try:
            argv = ["train", str(manifest), "--features", str(inputs.features), "--out", str(work / "mil")]
            assert holds_the_contract(inputs, argv, capsys) == EXIT_BAD_INPUT  # no features: never work
        finally:
            manifest.unlink()


@settings(SETTINGS, max_examples=15)
@given(data=manifests())
def test_tiling_any_manifest_ends_in_the_contract(inputs, capsys, data):
    with _work(inputs) as work:
        manifest = inputs.root / "generated.csv"
        manifest.write_bytes(data.replace(b"gs://bucket/x.svs", b"gs://"))  # no request to GCS
        try:
            holds_the_contract(inputs, ["tile", str(manifest), "--out", str(work / "tiles")], capsys)
        finally:
            manifest.unlink()


# ---- configs ----------------------------------------------------------------------------------------

SECTIONS = ["tiling", "mil", "finetune", "cka", "extraction", "evaluation", "sample_data", "export", "x"]
KEYS = ["target_mpp", "patch_size_px", "epochs", "lr", "hidden_dims", "batch_size", "seed", "tissue", "k"]
NUMBERS = st.one_of(
    st.integers(-(10**40), 10**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, 1, 2**31, 2**63, 0.5, 1e-320]),
)
SCALARS = st.one_of(NUMBERS, st.booleans(), st.none(), st.text(max_size=8))
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=4), inner, max_size=4),
    ),
    max_leaves=12,
)
SECTION_BODIES = st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=4)
YAML_EXTRAS = st.sampled_from(
    [
        "",
        "mil:\n  epochs: 1\nmil:\n  lr: 0.1\n",  # a section twice
        "tiling: {target_mpp: .nan}\n",
        "tiling: {target_mpp: -.inf}\n",
        "mil: {epochs: 99999999999999999999999999999999999999}\n",
        "a: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
        "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
        "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]\n",
        "loop: &l [*l]\n",
        "mil: !!python/object/apply:os.system [echo hi]\n",
        "mil: {epochs: !!int ten}\n",
        "tiling: [\n",
        "\t- x\n",
        "---\n",
        "? [a]\n: b\n",
        "mil: " + "[" * 60 + "]" * 60 + "\n",
    ]
)


@st.composite
def configs(draw) -> str:
    if draw(st.integers(0, 9)) == 0:
        return draw(st.text(max_size=80))
    sections = draw(st.dictionaries(st.sampled_from(SECTIONS), SECTION_BODIES, max_size=3))
    text = yaml.safe_dump(sections, allow_unicode=True) if sections else ""
    return text + draw(YAML_EXTRAS)


@SETTINGS
@given(text=configs())
def test_any_config_ends_in_the_contract(inputs, capsys, text):
    with _work(inputs) as work:
        config = work / "c.yaml"
        config.write_text(text, encoding="utf-8", errors="surrogatepass")
        argv = ["tile", str(inputs.manifest), "--out", str(work / "tiles"), "--config", str(config)]
        holds_the_contract(inputs, argv, capsys)


DOTTED = st.sampled_from(
    [
        "tiling.target_mpp",
        "tiling.patch_size_px",
        "tiling.tissue.mask_mpp",
        "tiling.tissue.pen_hue_deg",
        "tiling.overlap",
        "tiling",
        "mil.hidden_dims",
        "tiling.target_mpp.x",
        "nope",
        "",
        ".",
    ]
)
SET_VALUES = st.one_of(
    NUMBERS.map(str),
    st.text(max_size=20),
    st.sampled_from(["[1, 2]", "{a: 1, a: 2}", ".nan", "-.inf", "&a [*a]", "!!float x", "[", "~", "1e400"]),
    st.sampled_from(["0.5", "1.0", "256", "0.25", "[60, 245]", "{target_mpp: 1.0}"]),  # often valid
)


@SETTINGS
@given(
    pairs=st.lists(st.tuples(DOTTED, SET_VALUES), min_size=1, max_size=3),
    sep=st.sampled_from(["=", "", "=="]),
)
def test_any_set_ends_in_the_contract(inputs, capsys, pairs, sep):
    with _work(inputs) as work:
        argv = ["tile", str(inputs.manifest), "--out", str(work / "tiles")]
        for key, value in pairs:
            argv += ["--set", f"{key}{sep}{value}"]
        holds_the_contract(inputs, argv, capsys)


# ---- numbers for numeric flags ----------------------------------------------------------------------

FLAG_VALUES = st.one_of(
    st.integers(-(10**30), 10**30).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(
        ["0", "-0", "1", "-5", "nan", "inf", "-inf", "1e400", "1e-400", "0x10", "1_000", "", "2.5"]
    ),
)


@SETTINGS
@given(
    flags=st.dictionaries(
        st.sampled_from(["--batch-size", "--readers", "--threads", "--mpp"]), FLAG_VALUES, min_size=1
    )
)
def test_any_predict_flags_end_in_the_contract(inputs, capsys, flags):
    with _work(inputs) as work:
        argv = ["predict", str(inputs.slides[0]), "--bundle", str(inputs.bundle), "--out", str(work / "p")]
        argv += ["--no-heatmaps", *(part for flag, value in flags.items() for part in (flag, value))]
        code = holds_the_contract(inputs, argv, capsys)
        assert code != EXIT_OK  # the slide is no slide: it fails, or the flags do


@SETTINGS
@given(
    flags=st.dictionaries(
        st.sampled_from(["--target-mpp", "--patch-size", "--overlap", "--min-tissue-fraction"]),
        FLAG_VALUES,
        min_size=1,
    )
)
def test_any_tile_flags_end_in_the_contract(inputs, capsys, flags):
    with _work(inputs) as work:
        argv = ["tile", str(inputs.manifest), "--out", str(work / "tiles")]
        argv += [part for flag, value in flags.items() for part in (flag, value)]
        holds_the_contract(inputs, argv, capsys)


@SETTINGS
@given(
    flags=st.dictionaries(
        st.sampled_from(["--epochs", "--lr", "--folds", "--seed", "--seeds"]), FLAG_VALUES, min_size=1
    )
)
def test_any_train_flags_end_in_the_contract(inputs, capsys, flags):
    with _work(inputs) as work:
        argv = ["train", str(inputs.manifest), "--features", str(inputs.features), "--out", str(work / "mil")]
        argv += [part for flag, value in flags.items() for part in (flag, value)]
        assert holds_the_contract(inputs, argv, capsys) == EXIT_BAD_INPUT  # bad flags, or no features
