"""neulite: memory-efficient federated learning by progressive block-wise training."""

from neulite.errors import NeuliteError

__all__ = ["NeuliteError"]
__version__ = "0.1.0"
