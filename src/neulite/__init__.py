"""neulite: memory-efficient federated learning by progressive block-wise training.

The public API for a user's own network and data: write a `ModelFactory` returning a `BlockModel`
and a `DataFactory` returning `DataSplits` (`from_arrays` builds them), name them in the config
(registered with `register_model` / `register_dataset`, or by import path "module:function"), and
run with `run_experiment` or `compare`, or through Flower (import paths only). A residual unit may
mark an inner part `recomputable` to lower a recomputing stage's peak further.
"""

from neulite.compare import compare
from neulite.config import Config, load_config
from neulite.data.datasets import DataFactory, DataSplits, from_arrays, register_dataset
from neulite.errors import NeuliteError
from neulite.models.blocks import BlockModel, ClassifierHead
from neulite.models.recompute import recomputable
from neulite.models.zoo import ModelFactory, register_model
from neulite.simulation import run_experiment

__all__ = [
    "BlockModel",
    "ClassifierHead",
    "Config",
    "DataFactory",
    "DataSplits",
    "ModelFactory",
    "NeuliteError",
    "compare",
    "from_arrays",
    "load_config",
    "recomputable",
    "register_dataset",
    "register_model",
    "run_experiment",
]
__version__ = "0.1.0"
