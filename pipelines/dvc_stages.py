"""dvc.yaml, generated: the study's stages (histotransfer.stages.ORDER) as DVC stages over the CLI, their
outputs named by the study layout, their code dependencies found by following imports, and their
parameters the config keys that change results (histotransfer.core.config.SPEED_ONLY are not).

    make dvc-yaml        # writes dvc.yaml and params.yaml (a copy of the embedded demo's config);
                         # tests/unit/pipelines/test_dvc_yaml.py fails when either committed file is stale
"""

from __future__ import annotations

import ast
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from histotransfer import stages
from histotransfer.core.config import DEMO_CONFIG, SPEED_ONLY, StudyConfig

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
PACKAGE = "histotransfer"
ROOT = "${root}"
CONFIG = "--config params.yaml"
MANIFEST = f"{ROOT}/cohort/manifest.csv"


@dataclass(frozen=True)
class Stage:
    cmd: str
    outs: tuple[str, ...]
    sections: tuple[str, ...] = ()  # config sections whose result-changing keys are its params
    keys: tuple[str, ...] = ()  # single keys beside them
    deps: tuple[str, ...] = ()  # artifacts it reads
    foreach: str | None = None
    extra: dict = field(default_factory=dict)  # metrics, plots


STAGES = {
    "cohort": Stage(
        cmd=f"histotransfer cohort {ROOT}/cohort {CONFIG}",
        outs=(f"{ROOT}/cohort",),
        keys=("manifest",),
        sections=("sample_data",),
    ),
    "tile": Stage(
        cmd=f"histotransfer tile {MANIFEST} --out {ROOT}/tiles {CONFIG}",
        deps=(f"{ROOT}/cohort",),
        sections=("tiling",),
        outs=(f"{ROOT}/tiles",),
    ),
    "extract": Stage(
        foreach="${extraction.encoders}",
        cmd=f"histotransfer extract {MANIFEST} --tiles {ROOT}/tiles --encoder ${{item.id}} "
        f"--out {ROOT}/features {CONFIG}",
        deps=(f"{ROOT}/tiles",),
        sections=("extraction",),
        outs=(f"{ROOT}/features/${{item.id}}",),
    ),
    "train": Stage(
        foreach="${extraction.encoders}",
        cmd=f"histotransfer train {MANIFEST} --features {ROOT}/features/${{item.id}} --tiles {ROOT}/tiles "
        f"--out {ROOT}/mil {CONFIG}",
        deps=(f"{ROOT}/features/${{item.id}}",),
        sections=("mil", "evaluation"),
        outs=(f"{ROOT}/mil/${{item.id}}",),
    ),
    "finetune": Stage(
        foreach="${finetune.encoders}",
        cmd=f"histotransfer finetune {MANIFEST} --study {ROOT} --encoder ${{item.id}} {CONFIG}",
        deps=(f"{ROOT}/features/${{item.id}}", f"{ROOT}/mil/${{item.id}}"),
        sections=("extraction", "finetune", "mil", "evaluation"),
        outs=(
            f"{ROOT}/finetune/${{item.id}}",
            f"{ROOT}/features/${{item.id}}+ft",
            f"{ROOT}/mil/${{item.id}}+ft",
        ),
    ),
    "cka": Stage(
        foreach="${finetune.encoders}",
        cmd=f"histotransfer cka {MANIFEST} --study {ROOT} --encoder ${{item.id}} {CONFIG}",
        deps=(f"{ROOT}/finetune/${{item.id}}",),
        sections=("extraction", "cka"),
        outs=(
            f"{ROOT}/cka/${{item.id}}__${{item.id}}+ft-fold${{cka.fold}}.json",
            f"{ROOT}/cka/${{item.id}}__${{item.id}}+ft-fold${{cka.fold}}.png",
        ),
    ),
    "export": Stage(
        cmd=f"histotransfer export --study {ROOT} --out {ROOT}/onnx/${{export.name}} {CONFIG}",
        deps=(f"{ROOT}/mil", f"{ROOT}/finetune"),
        sections=("extraction", "export"),
        outs=(f"{ROOT}/onnx/${{export.name}}",),
    ),
    "report": Stage(
        cmd=f"histotransfer report {ROOT} --bundle {ROOT}/onnx/${{export.name}} --tracking",
        deps=(f"{ROOT}/mil", f"{ROOT}/cka", f"{ROOT}/onnx/${{export.name}}"),
        outs=(f"{ROOT}/report",),
        extra={
            "metrics": [{f"{ROOT}/metrics.json": {"cache": False}}],
            "plots": [
                {
                    f"{ROOT}/plots/roc": {
                        "cache": False,
                        "x": "fpr",
                        "y": "tpr",
                        "title": "out-of-fold ROC per encoder",
                    }
                },
                {
                    f"{ROOT}/plots/truncation.csv": {
                        "cache": False,
                        "x": "depth",
                        "y": "auc",
                        "title": "AUC vs cut point",
                    }
                },
            ],
        },
    ),
}


# ------------------------------------------------------------------------------------- code deps


def module_file(module: str) -> Path | None:
    path = SRC / (module.replace(".", "/") + ".py")
    if path.is_file():
        return path
    path = SRC / module.replace(".", "/") / "__init__.py"
    return path if path.is_file() else None


def _imports(path: Path, *, top_level: bool = False) -> set[str]:
    """The package's modules that ``path`` imports at run time: at any level (function-level imports
    included, ``if TYPE_CHECKING:`` blocks not), or ``top_level`` only."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {
        id(n)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and ast.unparse(block.test).endswith("TYPE_CHECKING")
        for n in ast.walk(block)
    }
    found = set()
    for node in tree.body if top_level else ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == PACKAGE:
            names = {f"{node.module}.{a.name}" for a in node.names}
            found |= {m for m in names if module_file(m)} or {node.module}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == PACKAGE}
    return found


def _home(module: str) -> str:
    """What a stage depends on for ``module``: its subpackage's folder, or the root module's file."""
    parts = module.split(".")
    if len(parts) > 2 or (len(parts) == 2 and (SRC / PACKAGE / parts[1]).is_dir()):
        return f"src/{PACKAGE}/{parts[1]}"
    return module_file(module).relative_to(REPO).as_posix()


def code_deps(stage: str) -> list[str]:
    """The subpackages (and root modules) that ``stage``'s module can run, following imports, and the
    CLI that calls it with what it imports when it starts (its commands import the stages' libraries
    when they run, which the stage's own imports cover)."""
    cli = f"{PACKAGE}.cli"
    todo = [f"{PACKAGE}.stages.{stage}", cli]
    seen: set[str] = set()
    while todo:
        module = todo.pop()
        if module in seen or (path := module_file(module)) is None:
            continue
        seen.add(module)
        if module == f"{PACKAGE}.stages":  # its __init__ imports every stage
            continue
        in_cli = module == cli or module.startswith(f"{cli}.")
        todo += _imports(path, top_level=in_cli)
        if in_cli and path.name == "__init__.py":
            todo += [f"{cli}.{p.stem}" for p in path.parent.glob("*.py") if p.stem != "__init__"]
    return sorted({_home(m) for m in seen})


def params_of(stage: Stage) -> list[str]:
    """The config keys that change the stage's results: whole sections where no key of theirs is a
    speed setting, else each of their other keys."""
    fields = StudyConfig.model_fields
    out = list(stage.keys)
    for section in stage.sections:
        speed = SPEED_ONLY.get(section, set())
        model = fields[section].annotation
        if not speed:
            out.append(section)
        else:
            out += [f"{section}.{k}" for k in model.model_fields if k not in speed]
    return out


# ------------------------------------------------------------------------------------------ render

HEADER = """\
# GENERATED by pipelines/dvc_stages.py (`make dvc-yaml`): edit that file, not this one.
# The HistoTransfer study as DVC stages over the same CLI as `histotransfer run` (both call
# histotransfer.stages), configured by the same params.yaml (validated by the same schema). Outputs live
# under study/ in the study layout (histotransfer.io.layout; DVC-tracked, git-ignored).
#   dvc repro                      # the demo study (or params.yaml's manifest); a second run does nothing
#   dvc exp run -S mil.epochs=30   # an experiment with one parameter changed
#   dvc metrics show / dvc params diff / dvc plots show
# Each stage depends on the subpackages its code can run (found by following imports) and on the
# config keys that change its results (speed settings such as extraction.batch_size are not params).
# cohort: params.yaml's manifest (absolute slide paths or gs://; after editing the file's rows, run
# `dvc repro --force cohort`), else the sample cohort. A fine-tuned copy of ID is ID+ft.
"""


def artifact_deps(stage: Stage) -> list[str]:
    """The study's artifacts a stage reads: its declared deps, and every other path under the study root
    that its command names and does not write into (the manifest, the tiles), so that DVC reruns it when
    one changes. ``--study ROOT`` (the whole study) is left to the declared deps."""
    named = re.findall(r"\$\{root\}/[^\s]+", stage.cmd)

    def inside(path: str, folders) -> bool:
        return any(path == f or path.startswith(f + "/") for f in folders)

    def written(path: str) -> bool:  # an output, or the folder an output is made in (--out)
        return inside(path, stage.outs) or any(inside(o, [path]) for o in stage.outs)

    extra = [p for p in named if not written(p) and not inside(p, stage.deps)]
    return [*stage.deps, *dict.fromkeys(extra)]


def pipeline() -> dict:
    """dvc.yaml as data."""
    assert tuple(STAGES) == stages.ORDER, "dvc_stages.STAGES must follow histotransfer.stages.ORDER"
    out = {}
    for name, stage in STAGES.items():
        body = {"cmd": stage.cmd, "deps": [*artifact_deps(stage), *code_deps(name)]}
        if params := params_of(stage):
            body["params"] = params
        body["outs"] = list(stage.outs)
        body |= stage.extra
        out[name] = body if stage.foreach is None else {"foreach": stage.foreach, "do": body}
    return {"vars": [{"root": "study"}], "stages": out}


def render() -> str:
    """dvc.yaml's text: the header, then the pipeline (a blank line before each stage)."""
    lines = yaml.safe_dump(pipeline(), sort_keys=False, width=120).splitlines()
    spaced = [f"\n{line}" if re.fullmatch(r"  [a-z_]+:", line) else line for line in lines]
    return HEADER + "\n".join(spaced) + "\n"


PARAMS_HEADER = "# GENERATED by `make dvc-yaml`: a copy of src/histotransfer/demo.yaml (the embedded demo).\n"


def params_text() -> str:
    """params.yaml's text: the embedded demo's config (histotransfer.core.config.DEMO_CONFIG)."""
    return PARAMS_HEADER + DEMO_CONFIG.read_text(encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    """Write dvc.yaml and params.yaml (into the folder given, default: the repository)."""
    folder = Path((argv or sys.argv[1:] or [REPO])[0])
    for name, text in (("dvc.yaml", render()), ("params.yaml", params_text())):
        (folder / name).write_text(text, encoding="utf-8")
        print(f"wrote {folder / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
