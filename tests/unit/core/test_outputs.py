"""Outputs: recognised by content for every kind of file histotransfer writes, never written over when
they are not ours, one writer per folder at a time, and SIGTERM handled as Ctrl-C."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from histotransfer.cli import EXIT_BAD_INPUT, EXIT_OK, EXIT_TERMINATED, main
from histotransfer.core.config import EvaluationConfig, MILConfig, TilingConfig
from histotransfer.core.errors import OutputError
from histotransfer.io.atomic import atomic_path, is_stale, temporary_name, write_text_atomic
from histotransfer.io.manifest import read_manifest
from histotransfer.io.marks import is_ours
from histotransfer.io.outputs import claim_output, release_all
from tests.helpers import REPO

FOREIGN = b"the user's own file, with one of our names\n"
BINARY = {".pt", ".onnx"}  # ours when a record of ours beside them lists them (tested below)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, sample_cohort, tiny_bundle) -> dict[str, Path]:
    """One folder of each kind, written by histotransfer's own writers."""
    from histotransfer.cka.layers import CKAResult, write_cka
    from histotransfer.mil.crossval import train_mil
    from histotransfer.report.html import write_report, write_tracking
    from histotransfer.wsi.tiling import tile_cohort
    from tests.helpers import synthetic_cohort

    root = tmp_path_factory.mktemp("kinds")
    tile_cohort(read_manifest(sample_cohort), out_dir=root / "tiles", tiling=TilingConfig())
    records, _, features = synthetic_cohort(root / "syn", n_bags=8, encoder_id="resnet18+random")
    mil = MILConfig(epochs=1, folds=2, restarts=1)
    evaluation = EvaluationConfig(bootstrap=100, heatmaps=0)
    result = train_mil(records, features_dir=features, out_dir=root / "mil", mil=mil, evaluation=evaluation)
    cka = CKAResult(np.eye(2), ["a", "b"], ["a", "b"], 8)
    write_cka(root / "cka" / "x__y.json", root / "cka" / "x__y.png", "x", "y", cka, {"kind": "cka"})
    write_report([result], report_dir=root / "report", tiles_dir=root / "tiles")
    write_tracking([result], metrics=root / "metrics.json", plots=root / "plots")
    return {
        "cohort": sample_cohort.parent,
        "tiles": root / "tiles",
        "features": features.parent,
        "mil": root / "mil",
        "cka": root / "cka",
        "report": root / "report",
        "plots": root / "plots",
        "bundle": tiny_bundle,
    }


KINDS = ["cohort", "tiles", "features", "mil", "cka", "report", "plots", "bundle"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_file_we_write_is_recognised_and_a_foreign_one_of_the_same_name_is_not(
    artifacts, tmp_path, kind
):
    folder = artifacts[kind]
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    assert files
    for path in files:
        assert is_ours(path), path  # content, not name: every file our writers wrote carries our mark
    checked = {}
    for path in files:  # one file of each type in each sub-folder, replaced by the user's own
        key = (path.parent, path.suffix)
        if path.suffix in BINARY or key in checked:
            continue
        checked[key] = path
        copy = shutil.copytree(folder, tmp_path / f"{kind}-{len(checked)}")
        claim_output(copy, kind)  # ours as it is
        release_all()
        (copy / path.relative_to(folder)).write_bytes(FOREIGN)
        with pytest.raises(OutputError, match="written by histotransfer") as info:
            claim_output(copy, kind)
        assert path.relative_to(folder).as_posix() in str(info.value)
    assert checked


def test_a_weights_file_is_ours_only_where_our_record_lists_it(artifacts, tmp_path):
    fold = shutil.copytree(artifacts["mil"] / "resnet18+random" / "fold0", tmp_path / "fold0")
    assert is_ours(fold / "model.pt")
    (fold / "extra.pt").write_bytes(FOREIGN)
    assert not is_ours(fold / "extra.pt")
    (fold / "history.json").write_text(json.dumps({"files": {"model.pt": "x"}}))  # not a record of ours
    assert not is_ours(fold / "model.pt")


def test_a_write_never_replaces_a_file_we_did_not_write(tmp_path):
    theirs = tmp_path / "summary.md"
    theirs.write_bytes(FOREIGN)
    with pytest.raises(OutputError, match="exists and is not a file histotransfer wrote"):
        write_text_atomic(theirs, "<!-- written by histotransfer -->\n")
    assert theirs.read_bytes() == FOREIGN
    ours = tmp_path / "table.json"
    write_text_atomic(ours, json.dumps({"histotransfer_version": "0"}))
    write_text_atomic(ours, json.dumps({"histotransfer_version": "1"}))  # ours: replaced
    assert json.loads(ours.read_text())["histotransfer_version"] == "1"
    with atomic_path(theirs, owned=True) as tmp:  # a cache entry the caller owns and verifies
        tmp.write_text("cache")
    assert theirs.read_text() == "cache"
    assert not list(tmp_path.glob(".*partial"))


def test_report_tracking_and_pipeline_yaml_are_recognised(tmp_path):
    (tmp_path / "metrics.json").write_text('{"auc": 1}')  # a user's own metrics file at the study root
    with pytest.raises(OutputError):
        write_text_atomic(tmp_path / "metrics.json", "{}")
    compiled = REPO / "pipelines" / "study.yaml"
    assert is_ours(compiled)
    (tmp_path / "study.yaml").write_text("# PIPELINE DEFINITION\n# Name: someone-else\n")
    assert not is_ours(tmp_path / "study.yaml")


# ----------------------------------------------------------------------------------------- one writer

HOLD = """
import sys, time
from histotransfer.io.outputs import claim_output
claim_output(sys.argv[1], "tiles")
print("held", flush=True)
time.sleep(60)
"""


def test_a_second_command_on_a_folder_in_use_is_refused_naming_the_first(sample_cohort, tmp_path, capsys):
    out = tmp_path / "tiles"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["tile", str(sample_cohort), "--out", str(out)]) == EXIT_BAD_INPUT
        err = capsys.readouterr().err
        assert f"is being written by another command (process {holder.pid}: " in err
        assert "wait for it to finish, or write to another folder" in err
        assert not list(out.iterdir())  # nothing written
    finally:
        holder.kill()
        holder.wait()
    assert main(["tile", str(sample_cohort), "--out", str(out)]) == EXIT_OK  # the lock died with it


def test_a_live_writers_temporary_file_is_never_removed(tmp_path):
    final = tmp_path / "a.json"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    try:
        live = temporary_name(final).name.replace(f"-{os.getpid()}-", f"-{sleeper.pid}-")
        dead = temporary_name(final).name.replace(f"-{os.getpid()}-", f"-{gone.stdout.strip()}-")
        elsewhere = f".a.json.another-host-{os.getpid()}-0123abcd.partial"
        for name in (live, dead, elsewhere):
            (tmp_path / name).write_text("half")
        assert not is_stale(tmp_path / live)
        assert is_stale(tmp_path / dead)
        write_text_atomic(final, json.dumps({"histotransfer_version": "0"}))
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["a.json", live, elsewhere])
    finally:
        sleeper.kill()
        sleeper.wait()


# -------------------------------------------------------------------------------------------- SIGTERM

TERM_SCRIPT = """
import os, signal, sys
import histotransfer.wsi.tiling as tiling
from histotransfer.cli import main
real, calls = tiling.tile_slide, []
def terminated_on_the_second(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGTERM)  # what docker stop and Kubernetes send
    return real(*args, **kwargs)
tiling.tile_slide = terminated_on_the_second
sys.exit(main(["tile", sys.argv[1], "--out", sys.argv[2]]))
"""


def test_sigterm_keeps_what_finished_says_so_and_resumes(sample_cohort, tmp_path):
    out = tmp_path / "tiles"
    proc = subprocess.run(
        [sys.executable, "-c", TERM_SCRIPT, str(sample_cohort), str(out)], capture_output=True, text=True
    )
    assert proc.returncode == EXIT_TERMINATED == 128 + signal.SIGTERM
    assert "terminated (SIGTERM): outputs that finished are kept" in proc.stderr
    assert "tile: 1 slide(s) finished, 0 failed, 3 left to do" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (out / "summary.csv").read_text().count(",done,") == 1
    assert not list(out.glob(".*.partial"))
    assert main(["tile", str(sample_cohort), "--out", str(out)]) == EXIT_OK  # resumes
    assert len(list(out.glob("*.h5"))) == 4


def test_a_folder_replaced_whole_keeps_the_users_dotfiles_and_refuses_their_other_files(tmp_path):
    from histotransfer.io.atomic import atomic_dir

    fold = tmp_path / "fold0"
    with atomic_dir(fold) as stage:
        (stage / "history.json").write_text(json.dumps({"histotransfer_version": "0"}))
    (fold / ".notes").write_text("the user's notes")
    with atomic_dir(fold) as stage:  # --overwrite: the fold is made again
        (stage / "history.json").write_text(json.dumps({"histotransfer_version": "1"}))
    assert (fold / ".notes").read_text() == "the user's notes"
    assert json.loads((fold / "history.json").read_text())["histotransfer_version"] == "1"
    (fold / "sub").mkdir()
    (fold / "sub" / ".hidden").write_text("deeper: not the folder's own")
    with (
        pytest.raises(OutputError, match=r"holds files histotransfer did not write \(sub/.hidden\)"),
        atomic_dir(fold),
    ):
        pass
    assert (fold / "sub" / ".hidden").is_file()
    assert not list(tmp_path.glob(".*partial"))


def test_sigterm_during_a_folder_swap_waits_until_the_new_folder_is_in_place(tmp_path, monkeypatch):
    from histotransfer.core.errors import Terminated
    from histotransfer.io import atomic
    from histotransfer.io.atomic import atomic_dir
    from histotransfer.io.lifecycle import command_scope

    fold = tmp_path / "fold0"
    with atomic_dir(fold) as stage:
        (stage / "history.json").write_text(json.dumps({"histotransfer_version": "old"}))
    real = os.replace

    def replace_then_terminated(src, dst):  # SIGTERM arrives between moving the old folder aside...
        real(src, dst)
        if str(dst).endswith(".old.partial"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)  # ...and has reached a thread (a worker's, perhaps) before the swap goes on

    monkeypatch.setattr(atomic.os, "replace", replace_then_terminated)
    # a worker thread alive (as torch's are): the kernel may hand the process's signal to it
    done = threading.Event()
    worker = threading.Thread(target=done.wait)
    worker.start()
    try:
        with command_scope(), pytest.raises(Terminated), atomic_dir(fold) as stage:
            (stage / "history.json").write_text(json.dumps({"histotransfer_version": "new"}))
    finally:
        done.set()
        worker.join()
    # ...and is handled once the new folder is in place: never neither
    assert json.loads((fold / "history.json").read_text())["histotransfer_version"] == "new"
