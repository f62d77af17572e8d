"""ewc-fused: Elastic Weight Consolidation fused into the Adam step.

    from ewc_fused import FusedEWCAdam
    opt = FusedEWCAdam(model.named_parameters(), lr=1e-3, ewc_lambda=100.0)
    ...train task A...
    opt.consolidate(fisher)          # {name: F}; penalty (λ/2)·Σ F (θ − θ*)² from now on
    ...train task B...

Triton kernels are imported only when the triton backend is used.
"""
from . import reference
from .fisher import estimate_fisher
from .fisher_io import load_fisher, save_fisher
from .functional import ewc_adam
from .optimizer import FusedEWCAdam, FusedEWCAdamW

__version__ = "0.1.0"
__all__ = ["FusedEWCAdam", "FusedEWCAdamW", "estimate_fisher", "load_fisher", "save_fisher", "ewc_adam", "reference", "__version__"]
