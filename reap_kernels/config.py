"""Block sizes of the MoE kernels: a small table of JSON files, looked up by shape and device.

Files live in ``reap_kernels/configs/``: ``default.json`` (any device), one file per compute capability
(``sm_80.json`` A100, ``sm_86.json`` RTX A6000 / 3090, ``sm_89.json`` RTX 4090 / L40, ``sm_90.json``
H100: untuned starting points, see README.md there) and one file per device named after
``torch.cuda.get_device_name()`` with spaces replaced by underscores, e.g.
``NVIDIA_H100_80GB_HBM3.json`` (what ``bench/tune.py`` writes on that device). Every file holds ``{"entries": [...]}``; an entry is::

    {"match": {"E": 128, "H": 2048, "I": 768, "k": 8},   # any subset of E, H, I, k (missing = any)
     "T": 2048,                                          # the token count the entry was tuned for
     "config": {"block_m": 64,
                "gate_up": {"block_n": 64, "block_k": 64, "group_m": 8, "num_warps": 4, "num_stages": 3},
                "down":    {"block_n": 128, "block_k": 64, "group_m": 8, "num_warps": 4, "num_stages": 3},
                "combine": {"block_h": 512, "num_warps": 4}}}

Lookup: the device file first, then the compute-capability file, then ``default.json``; among the entries whose ``match`` fits, the one
matching the most keys wins, ties broken by the nearest ``T`` (in log scale). ``bench/tune.py`` writes
such a file for one shape on the GPU it runs on; copy it to your device's file name. Under
``TRITON_INTERPRET=1`` one fixed small config is used.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "configs"
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # read when the kernels are decorated


class CachedHash:
    """For frozen dataclasses used as cache keys on every call: the field hash is computed once."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash(tuple(getattr(self, f.name) for f in fields(self))))

    def __hash__(self) -> int:
        return self._hash


@dataclass(frozen=True)
class GemmConfig(CachedHash):
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    __hash__ = CachedHash.__hash__

    def tile(self, block_m: int) -> tuple[int, int, int, int]:
        """(BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M): the grouped GEMM kernels' last constexprs, in their order."""
        return block_m, self.block_n, self.block_k, self.group_m

    def options(self) -> dict[str, int]:
        """The launch options (warps and pipeline stages)."""
        return dict(num_warps=self.num_warps, num_stages=self.num_stages)



@dataclass(frozen=True)
class MoEConfig(CachedHash):
    """Tile sizes of one MoE call; ``block_m`` is shared by the alignment and both GEMMs."""

    block_m: int
    gate_up: GemmConfig
    down: GemmConfig
    combine_block_h: int = 512
    combine_num_warps: int = 4
    __hash__ = CachedHash.__hash__

    @classmethod
    def from_dict(cls, data: dict) -> "MoEConfig":
        combine = data.get("combine", {})
        config = cls(
            block_m=int(data["block_m"]),
            gate_up=GemmConfig(**data["gate_up"]),
            down=GemmConfig(**data["down"]),
            combine_block_h=int(combine.get("block_h", 512)),
            combine_num_warps=int(combine.get("num_warps", 4)),
        )
        config.validate()
        return config

    def to_dict(self) -> dict:
        return {
            "block_m": self.block_m,
            "gate_up": asdict(self.gate_up),
            "down": asdict(self.down),
            "combine": {"block_h": self.combine_block_h, "num_warps": self.combine_num_warps},
        }

    def validate(self) -> None:
        sizes = [self.block_m, self.gate_up.block_n, self.gate_up.block_k, self.down.block_n, self.down.block_k]
        for size in sizes + [self.combine_block_h]:
            if size < 16 or size & (size - 1):
                raise ValueError(f"block sizes must be powers of two >= 16 (tl.dot), got {self.to_dict()}")


# The block sizes bench/tune.py may choose (its full grid) and the compile check covers.
TUNING_AXES = {
    "block_m": (16, 32, 64, 128),
    "block_n": (64, 128, 256),
    "block_k": (32, 64, 128),
    "num_warps": (4, 8),
    "num_stages": (2, 3, 4, 5),
    "group_m": (1, 4, 8, 16),
    "combine_block_h": (512, 1024),
    "combine_num_warps": (4, 8),
}


# Under the interpreter every program is run in numpy: small tiles keep the tests fast.
INTERPRETER_CONFIG = MoEConfig(
    block_m=16,
    gate_up=GemmConfig(block_n=32, block_k=32, group_m=4, num_warps=1, num_stages=1),
    down=GemmConfig(block_n=32, block_k=32, group_m=4, num_warps=1, num_stages=1),
    combine_block_h=64,
    combine_num_warps=1,
)


def device_file_name(device_name: str) -> str:
    return device_name.replace(" ", "_").replace("/", "_") + ".json"


@lru_cache(maxsize=None)
def _load_entries(path: Path) -> tuple:
    if not path.is_file():
        return ()
    with open(path) as handle:
        data = json.load(handle)
    entries = data.get("entries")
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected {{'entries': [...]}}")
    return tuple((entry.get("match", {}), int(entry["T"]), MoEConfig.from_dict(entry["config"])) for entry in entries)


def _best(entries: tuple, shape: dict[str, int], num_tokens: int) -> MoEConfig | None:
    best_key, best = None, None
    for match, tokens, config in entries:
        if any(shape.get(key) != value for key, value in match.items()):
            continue
        key = (-len(match), abs(math.log(max(num_tokens, 1)) - math.log(max(tokens, 1))))
        if best_key is None or key < best_key:
            best_key, best = key, config
    return best


_warned: set = set()


def arch_file_name(device: torch.device | None = None) -> str:
    """``sm_<major><minor>.json`` of a CUDA ``device`` (None: the current device)."""
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}.json"


def cuda_device_name(device: torch.device | None = None) -> str:
    """``torch.cuda.get_device_name`` of ``device`` (None: the current device), or "cpu"."""
    if device is not None and device.type != "cuda":
        return "cpu"
    if not torch.cuda.is_available():
        return "cpu"
    return torch.cuda.get_device_name(device)


def get_config(
    num_experts: int, hidden_size: int, inter_size: int, top_k: int, num_tokens: int, dtype: torch.dtype,
    device_name: str | None = None, device: torch.device | None = None,
) -> MoEConfig:
    """The block sizes for one MoE call (see the module docstring for the lookup order).

    The device file is the one of ``device_name``, else of ``device`` (a CUDA device: its own name,
    not the current device's), else of the current CUDA device.
    """
    if INTERPRET:
        return INTERPRETER_CONFIG
    if device_name is None:
        device_name = cuda_device_name(device)
    shape = {"E": num_experts, "H": hidden_size, "I": inter_size, "k": top_k}
    config = _best(_load_entries(CONFIG_DIR / device_file_name(device_name)), shape, num_tokens)
    if config is None and device_name != "cpu" and torch.cuda.is_available():
        config = _best(_load_entries(CONFIG_DIR / arch_file_name(device)), shape, num_tokens)
    if config is None:
        key = (device_name, tuple(shape.values()))
        if key not in _warned:
            _warned.add(key)
            logger.info("no tuned MoE kernel config for %s on %s; using the default table", shape, device_name)
        config = _best(_load_entries(CONFIG_DIR / "default.json"), shape, num_tokens)
    if config is None:
        raise RuntimeError(f"{CONFIG_DIR / 'default.json'} has no entry that matches {shape}")
    if dtype == torch.float32:
        # fp32 tiles take twice the shared memory: stay within ~100 KB (sm86) per program.
        config = MoEConfig(
            block_m=config.block_m,
            gate_up=GemmConfig(**{**asdict(config.gate_up), "block_k": 32, "num_stages": min(config.gate_up.num_stages, 2)}),
            down=GemmConfig(**{**asdict(config.down), "block_k": 32, "num_stages": min(config.down.num_stages, 2)}),
            combine_block_h=config.combine_block_h,
            combine_num_warps=config.combine_num_warps,
        )
    return config
