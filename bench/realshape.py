"""A random-weight checkpoint at the real Qwen3-30B-A3B layer shape, written shard by shard in the Hub's
per-expert layout (``mlp.experts.<e>.{gate,up,down}_proj.weight``), without building the model in memory;
and what the benchmarks built on it share (:func:`measure`: wall time, peak RSS, bytes read of a command).

    python bench/realshape.py DIR --layers 24        # ~1.25 GB per layer + 0.62 GB embeddings + 0.62 GB LM head
    python bench/realshape.py DIR --layers 2 --vocab 32768     # the 2.49 GiB speed checkpoint

Values: views of one seeded pool of N(0, 0.02) bf16 numbers at varying offsets (cheap to write, not a
trained model, routing still spreads over the experts); norms are ones. One shard per decoder layer.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # reap_lab/ lives at the repository root, not installed

QWEN3_30B_A3B = dict(hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                     num_attention_heads=32, num_key_value_heads=4, head_dim=128, intermediate_size=6144,
                     vocab_size=151936, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=4096)
_POOL = 1 << 25
# Every measured command caches its compiled modules here (this machine sets PYTHONDONTWRITEBYTECODE, so
# otherwise each start recompiles torch, transformers and datasets: ~15 s), for reap-fast and upstream alike.
PYCACHE = "/tmp/reap-fast-bench-pycache"


class _Values:
    """Tensors cut from one random pool at moving offsets."""

    def __init__(self, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.pool = (torch.randn(_POOL, generator=generator) * 0.02).to(torch.bfloat16)
        self.offset = 0

    def __call__(self, shape: tuple[int, ...], name: str) -> torch.Tensor:
        numel = 1
        for size in shape:
            numel *= size
        if "norm" in name:
            return torch.ones(shape, dtype=torch.bfloat16)
        out = torch.empty(numel, dtype=torch.bfloat16)
        done = 0
        while done < numel:
            start = self.offset % (_POOL - 1024)
            count = min(numel - done, _POOL - start)
            out[done : done + count] = self.pool[start : start + count]
            done += count
            self.offset += count + 7919
        return out.view(shape)


def hub_tensors(config) -> dict[str, tuple[int, ...]]:
    """Checkpoint names and shapes in the Hub's per-expert layout, from the model's (fused) state dict."""
    from reap_fast.models.weights import build_skeleton

    model = build_skeleton(config, torch.bfloat16)
    shapes: dict[str, tuple[int, ...]] = {}
    for name, value in model.state_dict(keep_vars=True).items():
        if name.endswith("experts.gate_up_proj"):
            experts, rows, cols = value.shape
            for e in range(experts):
                for part in ("gate_proj", "up_proj"):
                    shapes[f"{name[:-len('gate_up_proj')]}{e}.{part}.weight"] = (rows // 2, cols)
        elif name.endswith("experts.down_proj"):
            experts, rows, cols = value.shape
            for e in range(experts):
                shapes[f"{name[:-len('down_proj')]}{e}.down_proj.weight"] = (rows, cols)
        else:
            shapes[name] = tuple(value.shape)
    return shapes


def make(folder: Path, layers: int, seed: int = 0, vocab: int = QWEN3_30B_A3B["vocab_size"]) -> Path:
    """Write the checkpoint (config, byte tokenizer, one shard per layer + one for the rest)."""
    from safetensors.torch import save_file

    from reap_lab.tiny import byte_tokenizer, tiny_qwen3_moe_config
    from reap_fast.models.checkpoint_index import layer_of

    folder.mkdir(parents=True, exist_ok=True)
    shape = dict(QWEN3_30B_A3B, vocab_size=vocab)
    config = tiny_qwen3_moe_config(num_hidden_layers=layers, tie_word_embeddings=False, **shape)
    config.dtype = torch.bfloat16
    shapes = hub_tensors(config)
    groups: dict[int, list[str]] = {}
    for name in shapes:
        layer = layer_of(name)
        groups.setdefault(-1 if layer is None else layer, []).append(name)
    values = _Values(seed)
    weight_map, total = {}, 0
    for group, names in sorted(groups.items()):
        shard = f"model-{group + 2:05d}-of-{len(groups):05d}.safetensors"
        tensors = {name: values(shapes[name], name) for name in names}
        save_file(tensors, str(folder / shard), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map.update({name: shard for name in names})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    _readable_by_upstream(folder)
    return folder


def _readable_by_upstream(folder: Path) -> None:
    """Config and tokenizer spellings transformers 4.55 (upstream REAP's) reads too: ``torch_dtype`` next to
    ``dtype``, ``num_experts`` and ``rope_theta`` next to 5.x's names, the tokenizer class both name, special
    tokens as 4.55 lists them."""
    config = json.loads((folder / "config.json").read_text())
    config["torch_dtype"] = config.get("dtype", "bfloat16")
    if "num_local_experts" in config:  # transformers 5 spells Qwen3-MoE's num_experts so
        config.setdefault("num_experts", config["num_local_experts"])
    if "rope_parameters" in config:
        config.setdefault("rope_theta", config["rope_parameters"]["rope_theta"])
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    settings["tokenizer_class"] = "PreTrainedTokenizerFast"
    settings["additional_special_tokens"] = settings.pop("extra_special_tokens", [])
    settings.pop("backend", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(settings, indent=2))


def machine() -> str:
    """'<cpu model>, N cores, X GiB RAM' of this machine (for the tables)."""
    model = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        total = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal:"))
    except (OSError, StopIteration):
        total = 0
    return f"{model}, {os.cpu_count()} cores, {total / 2**20:.1f} GiB RAM"


def warm(folder: Path) -> None:
    """Read every file of ``folder`` once, so the page cache holds it (when it fits)."""
    for path in sorted(folder.iterdir()):
        if path.is_file():
            with open(path, "rb") as handle:
                while handle.read(64 << 20):
                    pass


def measure(argv: list[str], cwd: Path | None = None, env: dict | None = None, timeout: float = 7200) -> dict:
    """Run ``argv``; its wall time, peak RSS (``ru_maxrss`` of the child), bytes it read through read calls
    (``rchar``, polled from /proc) and from the disk (``ru_inblock``), exit status and output tail.
    Compiled modules are cached in ``PYCACHE`` (the first run of a command fills it: warm up before timing)."""
    env = dict(os.environ if env is None else env)
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # compiled modules cached as an installed package has them
    env.setdefault("PYTHONPYCACHEPREFIX", PYCACHE)
    began = time.perf_counter()
    process = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(process.stdout), daemon=True)
    reader.start()
    rchar, finished = 0, None
    while finished is None:
        try:
            io = dict(line.split(":") for line in open(f"/proc/{process.pid}/io"))
            rchar = int(io["rchar"])
        except (OSError, ValueError, KeyError):
            pass
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            finished = (status, usage)
        elif time.perf_counter() - began > timeout:
            process.kill()
        else:
            time.sleep(0.2)
    status, usage = finished
    process.returncode = os.waitstatus_to_exitcode(status)
    reader.join(timeout=5)
    return {
        "wall_s": round(time.perf_counter() - began, 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2),
        "read_gb": round(rchar / 1e9, 2), "disk_read_gb": round(usage.ru_inblock * 512 / 1e9, 2),
        "returncode": process.returncode, "tail": "".join(output)[-3000:],
        "plan": [line.strip() for line in output if "memory plan:" in line],
    }


def write_text_dataset(path: Path, documents: int = 400, seed: int = 0) -> Path:
    """A local JSONL calibration set (``text`` column) of ``documents`` documents of 600-1400 characters."""
    import random

    rng = random.Random(seed)
    words = "the of and a to in is that for it as was with be by on not he this are or his from at which".split()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        for index in range(documents):
            text = " ".join(rng.choice(words) for _ in range(rng.randint(150, 350)))
            handle.write(json.dumps({"text": f"Document {index}. {text}"}) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab", type=int, default=QWEN3_30B_A3B["vocab_size"],
                        help="vocabulary size (32768: the 2.49 GiB two-layer speed checkpoint of issue 28)")
    args = parser.parse_args()
    make(args.folder, args.layers, args.seed, args.vocab)


if __name__ == "__main__":
    main()
