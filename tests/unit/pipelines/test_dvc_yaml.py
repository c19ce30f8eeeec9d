"""The generated dvc.yaml and params.yaml: the committed files are what `make dvc-yaml` writes, every
stage depends on every module it can run, and a stage's params are the settings that change its results
(the study under `dvc repro`: tests/integration/test_dvc.py)."""

import yaml

from tests.helpers import REPO, modules_of


def test_the_committed_dvc_yaml_and_params_are_the_generated_ones():
    """dvc.yaml is generated (`make dvc-yaml`) from the stage list, the layout, the imports and the
    config schema; a hand edit or a code move that changes what a stage runs makes this fail."""
    from pipelines.dvc_stages import params_text, render

    assert (REPO / "dvc.yaml").read_text() == render(), "dvc.yaml is stale: run `make dvc-yaml`"
    assert (REPO / "params.yaml").read_text() == params_text(), "params.yaml is stale: `make dvc-yaml`"


def test_every_param_a_stage_names_is_in_params_yaml():
    """Regression: a new config key (mil.compare) reached dvc.yaml's params from the schema but not
    params.yaml (a copy of the demo config), and `dvc repro` stopped: "Parameters 'mil.compare' are
    missing from 'params.yaml'"."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    missing = []
    for name, stage in stages.items():
        for key in (stage.get("do", stage)).get("params", []):
            node = params
            for part in key.split("."):
                if not isinstance(node, dict) or part not in node:
                    missing.append(f"{name}: {key}")
                    break
                node = node[part]
    assert missing == [], f"dvc.yaml names params that params.yaml lacks: {missing}"


# each DVC stage's command and the stage function behind it
STAGE_ENTRY_POINTS = {
    "cohort": ("cmd_cohort", "cohort"),
    "tile": ("cmd_tile", "tile"),
    "extract": ("cmd_extract", "extract"),
    "train": ("cmd_train", "train"),
    "finetune": ("cmd_finetune", "finetune"),
    "cka": ("cmd_cka", "cka"),
    "export": ("cmd_export", "export"),
    "report": ("cmd_report", "report"),
}


def test_every_stage_depends_on_every_module_it_can_run():
    """Regression: stages' deps were listed by hand and missed modules that change their output (config,
    manifest, provenance, heatmaps, ...), so DVC kept a stale result after those changed. The generated
    deps (subpackages) cover every module the stage's command and function can import."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert set(stages) == set(STAGE_ENTRY_POINTS)
    for name, (command, stage) in STAGE_ENTRY_POINTS.items():
        declared = stages[name].get("do", stages[name])["deps"]
        needed = modules_of(("histotransfer.cli.commands", command), (f"histotransfer.stages.{stage}", stage))
        assert "src/histotransfer/io/layout.py" in needed
        missing = sorted(m for m in needed if not any(m == d or m.startswith(f"{d}/") for d in declared))
        assert not missing, f"dvc.yaml stage {name} lacks deps:\n" + "\n".join(f"- {m}" for m in missing)


def test_params_are_the_settings_that_change_results():
    """A speed setting (batch size, workers, the bag cache) is no stage's param: changing it
    reruns nothing; every other key of a section a stage reads is one."""
    from histotransfer.core.config import SPEED_ONLY, StudyConfig

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    params = {name: set(s.get("do", s).get("params", [])) for name, s in stages.items()}
    speed = {f"{section}.{key}" for section, keys in SPEED_ONLY.items() for key in keys}
    assert not speed & set().union(*params.values())
    results = {
        "extraction.precision",
        "extraction.backend",
        "extraction.encoders",
        "mil.epochs",
        "evaluation",
    }
    assert results <= params["train"] | params["extract"]
    for section in SPEED_ONLY:
        fields = set(StudyConfig.model_fields[section].annotation.model_fields)
        assert fields - SPEED_ONLY[section]  # every section keeps keys that matter


def test_every_artifact_a_stage_command_reads_is_a_dep():
    """Regression: train read cohort/manifest.csv (labels, patients, sites) and the tiles without
    depending on them, so a label edited in a user's manifest left the MIL results as they were. Every
    path under the study root that a stage's command names is a dep, unless the stage writes into it.
    Checked on the committed file, for every stage, with the rule written out here again."""
    import re

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]

    def under(path: str, folder: str) -> bool:
        return path == folder or path.startswith(folder + "/")

    for name, stage in stages.items():
        body = stage.get("do", stage)
        outs = [next(iter(o)) if isinstance(o, dict) else o for o in body["outs"]]
        for path in re.findall(r"\$\{root\}/\S+", body["cmd"]):
            if any(under(path, o) or under(o, path) for o in outs):
                continue  # an output, or the folder one is written into
            assert any(under(path, d) for d in body["deps"]), f"dvc.yaml stage {name} reads {path}, no dep"
    assert "${root}/cohort/manifest.csv" in stages["train"]["do"]["deps"]
