"""rso_ext: gradient-free training of PyTorch networks by random search (RSO, arXiv 2005.05955),
with a compiled extension ``rso_ext._C`` for candidate evaluation."""
from . import ops  # noqa: F401  (fails with build instructions when rso_ext._C is missing)
from . import data, losses, models  # noqa: F401
from .contract import Stats
from .rso import RSO, NonFiniteLossError, SweepStats

__all__ = ["RSO", "Stats", "SweepStats", "NonFiniteLossError", "ops", "data", "losses", "models"]
__version__ = "0.1.0"
