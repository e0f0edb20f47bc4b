"""Conversion from dense weights (``init="dense"``): pretrained dense MLPs into block-diagonal SCHEME mixers."""
from .adapted import init_adapted_from_dense
from .blocks import load_dense_blocks, undo_alpha
from .calibration import (CalibrationData, OutputErrorStats, calibration_batches, layer_io_tokens,
                          relative_output_error, run_dense_layers)
from .convert import init_from_dense
from .refit import Fc2Refit, mixer_hidden
from .report import InitReport, LayerInit, layer_output_errors
from .units import (DenseMlpWeights, Routes, assign_units, dense_weights, diagonal_units, energy_scores,
                    original_unit_slots, total_score)

__all__ = [
    "CalibrationData", "DenseMlpWeights", "Fc2Refit", "InitReport", "LayerInit", "OutputErrorStats", "Routes",
    "assign_units", "calibration_batches", "dense_weights", "diagonal_units", "energy_scores", "init_from_dense",
    "init_adapted_from_dense", "layer_io_tokens", "layer_output_errors", "load_dense_blocks", "mixer_hidden",
    "original_unit_slots", "relative_output_error", "run_dense_layers", "total_score", "undo_alpha",
]
