"""The benchmark sections, one module per thing measured; ``benchmarks.run`` calls the tables named here."""
from .adapted import adapted_table
from .block import block_tables, shuffle_table
from .common import Plan
from .compiled import compile_amp_table
from .int8 import quantized_table
from .kernels import kernel_table
from .models import model_table
from .scaling import scaling_tables
from .training import train_table

__all__ = ["Plan", "kernel_table", "block_tables", "shuffle_table", "model_table", "train_table",
           "compile_amp_table", "scaling_tables", "quantized_table", "adapted_table"]
