"""The `inference` pipeline: an ONNX bundle (by URI) classifies new slides with ONNX Runtime."""

from kfp import dsl
from kfp.dsl import Model

from components import predict_step
from histotransfer import __version__
from pipelines.options import PipelineOptions

NAME = "histotransfer-inference"


def build(options: PipelineOptions | None = None):
    options = options or PipelineOptions()

    @dsl.pipeline(name=NAME, description=f"Classify slides with a histotransfer ONNX bundle, {__version__}")
    def inference(bundle_uri: str, slides: str):
        """``bundle_uri``: a bundle folder (gs://.../onnx/best); ``slides``: slide, gs:// URI or manifest."""
        bundle = dsl.importer(artifact_uri=bundle_uri, artifact_class=Model, reimport=False)
        options.step(predict_step(bundle=bundle.output, slides=slides), gpu=True, cache=False)

    return inference
