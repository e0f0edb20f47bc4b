"""Checkpoints and the Hugging Face Hub: timm's Hub layout (``config.json`` + ``model.safetensors`` +
``README.md``), a timm entry point that rebuilds SCHEME models from it, the save / push / load trio, and
ONNX and TorchScript export of fused models.

Importing this registers :data:`ENTRYPOINT` with timm, so that ``timm.create_model('hf-hub:...')`` and
``timm.create_model('local-dir:...')`` load SCHEME checkpoints like any timm model.
"""
from . import entrypoint as _entrypoint  # noqa: F401  (registers the timm entry point)
from .format import FORMAT_VERSION, ENTRYPOINT, CheckpointFormatError, CheckpointSpec, spec_of
from .hub import from_pretrained, push_folder_to_hub, push_to_hub
from .artifacts import ExportVerificationError
from .onnx import OnnxVerificationError, export_onnx
from .torchscript import export_torchscript
from .save import save_pretrained
from .weights import read_training_checkpoint

__all__ = [
    "save_pretrained", "push_to_hub", "push_folder_to_hub", "from_pretrained", "read_training_checkpoint", "CheckpointSpec",
    "CheckpointFormatError", "spec_of", "FORMAT_VERSION", "ENTRYPOINT", "export_onnx", "OnnxVerificationError",
    "export_torchscript", "ExportVerificationError",
]
