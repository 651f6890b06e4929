"""A random-weight checkpoint at the real Qwen3-30B-A3B layer shape, written shard by shard in the Hub's
per-expert layout (``mlp.experts.<e>.{gate,up,down}_proj.weight``), without building the model in memory.

    python bench/realshape.py DIR --layers 24        # ~1.25 GB per layer + 0.62 GB embeddings + 0.62 GB LM head
    python bench/realshape.py DIR --layers 2 --vocab 32768     # the 2.49 GiB speed checkpoint

Values: views of one seeded pool of N(0, 0.02) bf16 numbers at varying offsets (cheap to write, not a
trained model, routing still spreads over the experts); norms are ones. One shard per decoder layer.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

QWEN3_30B_A3B = dict(hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                     num_attention_heads=32, num_key_value_heads=4, head_dim=128, intermediate_size=6144,
                     vocab_size=151936, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=4096)
_POOL = 1 << 25


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

    from reap_fast.lab.tiny import byte_tokenizer, tiny_qwen3_moe_config
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
    return folder


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
