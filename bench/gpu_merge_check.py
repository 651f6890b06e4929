"""GPU check of the merging statistics (upstream's default command): numbers, time and memory, one script.

The ``merge_check`` step of ``bench/gpu_check.sh``::

    step merge_check "$PYTHON" bench/gpu_merge_check.py --samples 2 --json "$OUT/merge_check.json"

1. **Numbers**: one Qwen3-30B-A3B MoE layer (E=128, k=8, H=2048, I=768, bf16, random weights) observed
   through the Triton engine with merging statistics on ``--check-tokens`` tokens (a few padded); the five
   statistics are recomputed on the same device in float64 from the layer's own bf16 expert outputs with
   ``F.cosine_similarity`` broadcasts, upstream's formulas (no Gram matrices, no chunks), and compared
   (1e-4 relative + 1e-6 absolute).
2. **Time and memory**: a 2-layer model at the real shape, ``--samples`` sequences of 2048 tokens,
   batch 1, observed in memory with the Triton engine without and with merging statistics: seconds,
   tokens/s, the ratio, and peak GPU memory (``torch.cuda.max_memory_allocated``) of each.

Exit status 0 when the numbers agree. Without CUDA it runs a tiny shape under the Triton interpreter
(``--tiny``), to check the script itself, never for speed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # reap_lab/ lives at the repository root, not installed

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402

from reap_lab.tiny import build_model, tiny_qwen3_moe_config  # noqa: E402
from reap_fast.merge_metrics import MERGE_KEYS  # noqa: E402
from reap_fast.models import find_moe_layers  # noqa: E402
from reap_fast.observe import Observer  # noqa: E402

REAL = dict(hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
            num_attention_heads=32, num_key_value_heads=4, head_dim=128, intermediate_size=6144,
            vocab_size=151936, rms_norm_eps=1e-6, rope_theta=1e6)
TINY = dict(hidden_size=64, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2)


def _model(shape: dict, layers: int, device: str, dtype: torch.dtype):
    config = tiny_qwen3_moe_config(num_hidden_layers=layers, **shape)
    with torch.device(device):
        return build_model(config, seed=0, dtype=dtype).eval()


def _expected(model, input_ids, mask) -> dict[int, dict[str, torch.Tensor]]:
    """Upstream's formulas in float64 on the stock model's MoE inputs (one forward call)."""
    captured = {}
    layers = find_moe_layers(model)
    hooks = [layer.router.register_forward_hook(
        lambda module, args, output, index=layer.layer_index: captured.__setitem__(index, args[0]))
        for layer in layers]
    with torch.no_grad():
        model(input_ids=input_ids, attention_mask=mask.long())
    for hook in hooks:
        hook.remove()
    keep = mask.reshape(-1)
    result = {}
    for layer in layers:
        x = captured[layer.layer_index].reshape(-1, captured[layer.layer_index].shape[-1])[keep]  # counted rows only
        logits = F.linear(x, layer.router.weight)
        top = torch.topk(logits.float(), model.config.num_experts_per_tok, dim=-1).indices
        experts = layer.experts
        ys = []
        for e in range(experts.down_proj.shape[0]):
            h = F.linear(x, experts.gate_up_proj[e])
            ys.append(F.linear(experts._apply_gate(h), experts.down_proj[e]))
        y = torch.stack(ys, dim=1).double()  # (T, E, H): the layer's own bf16 outputs, then float64
        count, num_experts, _ = y.shape
        dist = torch.stack([1 - F.cosine_similarity(y[t].unsqueeze(1), y[t].unsqueeze(0), dim=-1)
                            for t in range(count)])  # (T, E, E)
        freq = torch.bincount(top.reshape(-1), minlength=num_experts).double()
        ttm = torch.zeros(num_experts, num_experts, dtype=torch.float64, device=y.device)
        routed = torch.zeros(num_experts, y.shape[-1], dtype=torch.float64, device=y.device)
        for t in range(count):
            for e in top[t].tolist():
                ttm[e] += dist[t, e]
                routed[e] += y[t, e]
        pairs = freq[None, :] + freq[:, None]
        ttm = torch.where(pairs > 0, (ttm + ttm.T) / pairs.clamp(min=1), 0.0).fill_diagonal_(0.0)
        columns = logits.double().T
        result[layer.layer_index] = {
            "ttm_similarity_matrix": ttm,
            "routed_characteristic_activation": torch.where(freq[:, None] > 0, routed / freq.clamp(min=1)[:, None], 0.0),
            "characteristic_activation": y.mean(dim=0),
            "online_characteristic_activation_dist": dist.mean(dim=0),
            "router_logit_similiarity": 1 - F.cosine_similarity(columns.unsqueeze(1), columns.unsqueeze(0), dim=-1),
        }
    return result


def check_numbers(shape: dict, device: str, tokens: int) -> list[str]:
    model = _model(shape, 1, device, torch.bfloat16)
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 256, (1, tokens), generator=generator).to(device)
    mask = torch.ones(1, tokens, dtype=torch.bool, device=device)
    mask[0, -3:] = False
    with Observer(model, engine="triton", merging=True) as observer:
        observer.forward(input_ids, mask.long(), mask)
    ours = observer.metrics()
    expected = _expected(model, input_ids, mask)
    problems = []
    for layer, values in expected.items():
        for key in MERGE_KEYS:
            got, want = ours[layer][key].double(), values[key].cpu()
            if not torch.allclose(got, want, rtol=1e-4, atol=1e-6):
                problems.append(f"layer {layer} {key}: largest difference {float((got - want).abs().max()):.3g}")
    return problems


def time_observation(shape: dict, device: str, samples: int, length: int) -> dict:
    model = _model(shape, 2, device, torch.bfloat16)
    generator = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, 256, (1, length), generator=generator).to(device) for _ in range(samples)]
    timing = {}
    for merging in (False, True):
        if CUDA:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        began = time.perf_counter()
        with Observer(model, engine="triton", merging=merging) as observer:
            for input_ids in batches:
                observer.forward(input_ids)
        observer.metrics()
        if CUDA:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - began
        name = "with_merging" if merging else "pruning_only"
        timing[name] = {"seconds": seconds, "tokens_per_s": samples * length / seconds,
                        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if CUDA else None}
    timing["merging_cost_ratio"] = timing["with_merging"]["seconds"] / timing["pruning_only"]["seconds"]
    return timing


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--check-tokens", type=int, default=64)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--tiny", action="store_true", help="tiny shape (the default without CUDA)")
    args = parser.parse_args()
    tiny = args.tiny or not CUDA
    shape, device = (TINY, "cuda" if CUDA else "cpu") if tiny else (REAL, "cuda")
    length = 64 if tiny else 2048
    problems = check_numbers(shape, device, args.check_tokens if not tiny else 16)
    timing = time_observation(shape, device, args.samples if not tiny else 1, length)
    result = {"device": torch.cuda.get_device_name() if CUDA else "cpu (interpreter, not a speed figure)",
              "shape": "tiny" if tiny else "Qwen3-30B-A3B", "problems": problems, "timing": timing}
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
