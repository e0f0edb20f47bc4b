"""Training SCHEME models: the one loop every command and example uses, the data of a run (and the digits that
ship with scikit-learn), data-parallel processes, distillation from a dense teacher, and a whole ``timm-scheme
train`` run."""
from .loop import evaluate, random_batches, short_schedule, train_one_epoch

__all__ = ["train_one_epoch", "evaluate", "short_schedule", "random_batches"]
