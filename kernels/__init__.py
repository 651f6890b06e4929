"""reap_kernels: Triton kernels of the routed MoE forward with fused REAP statistics.

The folder is ``kernels/`` in the repository but the package is imported as ``reap_kernels`` so that
the Hugging Face ``kernels`` package is never shadowed. See README.md in this folder.
"""

from .align import Alignment, align_by_expert
from .config import INTERPRET, GemmConfig, MoEConfig, get_config
from .moe import ExpertsLayout, fused_moe

__all__ = ["Alignment", "align_by_expert", "INTERPRET", "GemmConfig", "MoEConfig", "get_config", "ExpertsLayout", "fused_moe"]
