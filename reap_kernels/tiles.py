"""Tile ordering shared by the grouped GEMM kernels."""

import triton
import triton.language as tl


@triton.jit
def grouped_tile(pid, max_blocks, num_cols, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row block, column tile) of program ``pid``, in groups of GROUP_M row blocks.

    GROUP_M consecutive row blocks (mostly of one expert, since rows are sorted by expert) sweep one
    column tile together, so an expert's weight tile is read from DRAM once and then hit in L2.
    """
    num_pid_n = tl.cdiv(num_cols, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_m = (pid // num_pid_in_group) * GROUP_M
    group_size = tl.minimum(max_blocks - first_m, GROUP_M)
    pid_m = first_m + (pid % num_pid_in_group) % group_size
    pid_n = (pid % num_pid_in_group) // group_size
    return pid_m, pid_n
