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


@triton.jit
def accumulate_k(
    a_ptrs,  # (BLOCK_M, BLOCK_K) pointers into the row operand at K offset 0
    w_ptrs,  # (BLOCK_K, N) pointers into one expert's weight at K offset 0
    acc,  # (BLOCK_M, N) fp32 accumulator
    k_size,  # reduction length
    col_ok,  # (N,) bool: columns of the weight tile inside the matrix
    stride_ak,
    stride_wk,
    UPCAST: tl.constexpr,  # fp32 tiles before tl.dot (interpreter, fp32 inputs)
    EVEN_K: tl.constexpr,  # k_size % BLOCK_K == 0: no K masks
    EVEN_N: tl.constexpr,  # every column inside: no column masks
    DOT_PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``acc + A @ W`` over the whole reduction in BLOCK_K steps, the one K loop of both grouped GEMMs.

    Padding rows of A must already point at a valid row (they are loaded, never stored), so A needs no
    row mask; K and column masks are compiled in only where the sizes need them.
    """
    offs_k = tl.arange(0, BLOCK_K)
    for k_start in range(0, k_size, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            if EVEN_N:
                w = tl.load(w_ptrs)
            else:
                w = tl.load(w_ptrs, mask=col_ok[None, :], other=0.0)
        else:
            k_ok = offs_k < k_size - k_start
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk
    return acc
