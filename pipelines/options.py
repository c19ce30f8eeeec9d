"""Compile-time options of the pipelines: where GPU steps run and how steps reach GCS.

Resources and Kubernetes settings are fixed when a pipeline is compiled (kfp.local ignores them);
`histotransfer pipeline compile/submit` take them as flags, and the committed YAML uses the defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kfp import dsl, kubernetes

from histotransfer.core.config import DEMO_CONFIG

REPO = Path(__file__).resolve().parents[1]
PARAMS = DEMO_CONFIG  # the embedded demo (params.yaml is its copy): the pipelines' default parameters
GCS_KEY_DIR = "/var/secrets/google"


@dataclass(frozen=True)
class PipelineOptions:
    gpu: bool = True  # GPU steps (extract, finetune, cka, predict) request one nvidia.com/gpu
    gpu_node_selector: tuple[str, str] | None = ("nvidia.com/gpu.present", "true")  # GPU operator's label
    gpu_toleration: str | None = "nvidia.com/gpu"  # tolerate the usual taint of GPU node pools
    gcs_secret: str | None = None  # a Kubernetes secret with key.json; None: workload identity
    cpu: str = "4"  # CPU request of every step
    memory: str = "16G"  # memory request of every step
    image: str | None = None  # every step's image instead of components.image.IMAGE (local Docker runs)

    def step(self, task: dsl.PipelineTask, *, gpu: bool = False, cache: bool = True) -> dsl.PipelineTask:
        """Apply resources, caching and GCS credentials to a task; ``gpu`` adds the accelerator."""
        task.set_cpu_request(self.cpu).set_memory_request(self.memory).set_caching_options(cache)
        if self.image:
            task.set_container_image(self.image)
        if gpu and self.gpu:
            task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(1)
            if self.gpu_node_selector:
                kubernetes.add_node_selector(task, *self.gpu_node_selector)
            if self.gpu_toleration:
                kubernetes.add_toleration(
                    task, key=self.gpu_toleration, operator="Exists", effect="NoSchedule"
                )
        if self.gcs_secret:
            kubernetes.use_secret_as_volume(task, secret_name=self.gcs_secret, mount_path=GCS_KEY_DIR)
            task.set_env_variable("GOOGLE_APPLICATION_CREDENTIALS", f"{GCS_KEY_DIR}/key.json")
        return task


def default_parameters(config_path: Path = PARAMS) -> dict[str, Any]:
    """Pipeline parameters from a config file (validated by the same schema as `histotransfer run`)."""
    from histotransfer.core.config import StudyConfig, load_config
    from histotransfer.core.errors import ConfigError
    from histotransfer.stages.adapter import SECTIONS

    config = load_config(config_path)
    # KFP parameters cannot hold null: drop None values, which works where None is the schema default
    dumped = config.model_dump(mode="json", exclude_none=True)
    params: dict[str, Any] = {name: dumped[name] for name in SECTIONS}
    rebuilt = StudyConfig.model_validate({**params, "output_dir": config.output_dir})
    for name in SECTIONS:
        if getattr(rebuilt, name) != getattr(config, name):
            raise ConfigError(
                f"{config_path}: section `{name}` sets a key to null where the default is not null; "
                "pipeline parameters cannot carry null: give the value explicitly"
            )
    # "": the sample cohort. An Optional parameter left unset cannot run under kfp.local (2.x fails on
    # its null default in join_user_inputs_and_defaults), so this one parameter keeps the empty string
    params["manifest"] = "" if config.manifest is None else str(config.manifest)
    return params


def read_yaml(path: Path) -> Any:
    """A YAML file read as configs are (histotransfer.core.config.load_yaml: duplicate keys, alias bombs
    and syntax errors are ConfigErrors naming the file and line)."""
    from histotransfer.core.config import read_yaml_file

    return read_yaml_file(path, what="file")
