"""Host-side size arithmetic in plain Python (``triton.cdiv`` / ``next_power_of_2`` are constexpr functions
in triton 3.9 and cost microseconds per call on the launch path)."""


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1
