"""reap_kernels: Triton kernels of the routed MoE forward with fused REAP statistics.

The folder is ``kernels/`` in the repository but the package is imported as ``reap_kernels`` so that
the Hugging Face ``kernels`` package is never shadowed. See README.md in this folder.
"""

# Run from the repository root, Python can also find this folder as a top-level `kernels` (transformers
# probes that name for the Hugging Face package). Under any name but `reap_kernels` it stays empty, so
# such a probe neither loads Triton nor mistakes it for the Hugging Face package (no __version__).
if __name__ == "reap_kernels":
    from .align import Alignment, align_by_expert
    from .config import INTERPRET, GemmConfig, MoEConfig, get_config
    from .moe import ExpertsLayout, fused_moe

__all__ = ["Alignment", "align_by_expert", "INTERPRET", "GemmConfig", "MoEConfig", "get_config", "ExpertsLayout", "fused_moe"]
