"""reap_kernels: Triton kernels of the routed MoE forward with fused REAP statistics.

The folder and the import name are both ``reap_kernels``: nothing in the repository is named ``kernels``, so the
Hugging Face ``kernels`` package (which transformers imports) is never shadowed, whatever the working directory.
See README.md in this folder.
"""

from .align import Alignment, align_by_expert
from .config import INTERPRET, GemmConfig, MoEConfig, get_config
from .moe import ExpertsLayout, fused_moe
from .router_gate import RouterGate
from .validate import UnsupportedInputError

__all__ = ["Alignment", "align_by_expert", "INTERPRET", "GemmConfig", "MoEConfig", "get_config", "ExpertsLayout", "fused_moe",
           "RouterGate", "UnsupportedInputError"]
