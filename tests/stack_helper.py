"""Run under any transformers version (4.55 in the upstream venv, or 5.x): make tiny source checkpoints
the way that version saves them, and load folders to record their greedy generations.

    python tests/stack_helper.py make OUT_DIR FAMILY [FAMILY ...]   # OUT_DIR/FAMILY, bf16, sharded
    python tests/stack_helper.py generate RESULT.json FOLDER [FOLDER ...]

Only torch, tokenizers and transformers are imported (plus reap_lab.tiny's byte tokenizer, which
works under both versions), so the upstream venv needs no reap-fast install.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from reap_lab.tiny import byte_tokenizer  # noqa: E402

PROMPT_IDS = [72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100]
NEW_TOKENS = 8
SHARD_SIZE = "60KB"  # several shards and an index, as real checkpoints have

_COMMON = dict(
    vocab_size=264, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    max_position_embeddings=4096, tie_word_embeddings=False, eos_token_id=256, pad_token_id=257, bos_token_id=None,
)
_NO_HEAD_DIM = {key: value for key, value in _COMMON.items() if key != "head_dim"}

# family -> (config class name, keyword arguments): the sizes of reap_lab.families_tiny, 8 experts, top-2
FAMILIES = {
    "qwen3_moe": ("Qwen3MoeConfig", dict(
        _COMMON, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2, num_experts=8,
        num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])),
    "mixtral": ("MixtralConfig", dict(
        _COMMON, intermediate_size=32, num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2)),
    "olmoe": ("OlmoeConfig", dict(
        _NO_HEAD_DIM, intermediate_size=32, num_hidden_layers=2, num_experts=8, num_experts_per_tok=2)),
    "deepseek_v3": ("DeepseekV3Config", dict(
        _NO_HEAD_DIM, num_key_value_heads=4, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        first_k_dense_replace=1, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2,
        topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True, q_lora_rank=None, kv_lora_rank=16,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)),
    "glm4_moe": ("Glm4MoeConfig", dict(
        _COMMON, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3, first_k_dense_replace=1,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1,
        routed_scaling_factor=1.5, norm_topk_prob=True)),
    "gpt_oss": ("GptOssConfig", dict(
        _COMMON, intermediate_size=32, num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2,
        layer_types=["full_attention"] * 2)),
    "llama4_text": ("Llama4TextConfig", dict(
        _COMMON, intermediate_size=32, intermediate_size_mlp=96, num_hidden_layers=4, interleave_moe_layer_step=2,
        num_local_experts=8, num_experts_per_tok=2)),
    "ernie4_5_moe": ("Ernie4_5_MoeConfig", dict(
        _NO_HEAD_DIM, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3, moe_layer_start_index=1,
        moe_layer_interval=1, moe_num_experts=8, moe_k=2, moe_num_shared_experts=1)),
    "deepseek_v2": ("DeepseekV2Config", dict(
        _NO_HEAD_DIM, num_key_value_heads=4, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        first_k_dense_replace=1, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
        topk_method="group_limited_greedy", n_group=2, topk_group=1, routed_scaling_factor=16.0, norm_topk_prob=False,
        q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)),
}


def make_source(folder: Path, family: str, seed: int = 0) -> None:
    """A seeded random bf16 checkpoint of ``family`` saved by this transformers version (sharded)."""
    class_name, settings = FAMILIES[family]
    config = getattr(transformers, class_name)(**settings)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():  # routers start at zero in some families
            if name.endswith(("mlp.gate.weight", "mlp.router.weight", "block_sparse_moe.gate.weight")):
                param.copy_(torch.randn(param.shape, generator=generator))
            if name.endswith("e_score_correction_bias") or name.endswith("router.bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    model = model.to(torch.bfloat16)
    model.generation_config.max_new_tokens = NEW_TOKENS
    model.save_pretrained(folder, max_shard_size=SHARD_SIZE)
    byte_tokenizer().save_pretrained(folder)


@torch.no_grad()
def generate(folder: Path) -> dict:
    """Greedy tokens and last-position logits of ``folder`` loaded in float32 (same arithmetic in every version)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32) if _V5 else \
        transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    model.eval()
    prompt = torch.tensor([PROMPT_IDS])
    logits = model(prompt).logits[0, -1]
    output = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS, do_sample=False,
                            min_new_tokens=NEW_TOKENS, pad_token_id=257)
    return {"tokens": output[0, len(PROMPT_IDS):].tolist(), "logits": logits.tolist(), "version": transformers.__version__}


_V5 = int(transformers.__version__.split(".")[0]) >= 5


def main(argv: list[str]) -> int:
    command, target, *rest = argv
    if command == "make":
        for family in rest:
            make_source(Path(target) / family, family)
        return 0
    if command == "generate":
        results = {folder: generate(Path(folder)) for folder in rest}
        Path(target).write_text(json.dumps(results), encoding="utf-8")
        return 0
    raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
