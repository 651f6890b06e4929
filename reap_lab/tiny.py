"""The built-in tiny MoE: a byte-level tokenizer and small Qwen3-MoE checkpoints made offline.

Used by the demo and by the tests. Nothing here downloads anything: the tokenizer is built from the
256 byte values, and the weights are seeded random (or trained briefly by the quality study).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast, Qwen3MoeConfig

from reap_fast.outputs import apply_umask

SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>")

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (one token per UTF-8 byte, four special tokens, a chat template)."""
    vocab = {char: index for index, char in enumerate(_byte_alphabet())}
    for offset, token in enumerate(SPECIAL_TOKENS):
        vocab[token] = 256 + offset
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=4096,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_qwen3_moe_config(**overrides: object) -> Qwen3MoeConfig:
    """A Qwen3-MoE config small enough for a 2-core CPU (overrides win)."""
    settings: dict[str, object] = dict(
        vocab_size=264,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        max_position_embeddings=4096,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        tie_word_embeddings=False,
        eos_token_id=256,
        pad_token_id=257,
        bos_token_id=None,
    )
    settings.update(overrides)
    return Qwen3MoeConfig(**settings)


def build_model(config, seed: int = 0, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A randomly initialised causal LM for ``config`` (deterministic for a seed)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # Router weights start at zero in some families; give every router a seeded random start so
    # that routing is not degenerate in tests.
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight") and param.dim() == 2:
                param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float32).to(param.dtype))
    return model.eval()


def save_checkpoint(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, folder: str | os.PathLike) -> Path:
    """Save model + tokenizer as a Hugging Face folder (safetensors), files with the umask's mode (transformers
    writes the weights 0600 through a temporary file)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    apply_umask(folder, recursive=True)
    return folder


def make_tiny_checkpoint(folder: str | os.PathLike, seed: int = 0, **config_overrides: object) -> Path:
    """Build and save the built-in tiny Qwen3-MoE checkpoint into ``folder``."""
    model = build_model(tiny_qwen3_moe_config(**config_overrides), seed=seed)
    return save_checkpoint(model, byte_tokenizer(), folder)


def random_observation(counts: dict[int, int], seed: int = 0) -> dict[int, dict[str, torch.Tensor]]:
    """An observation with every pruning key for ``{layer: experts}``: random scores (seeded), 10 tokens per
    expert; for pruning and disk measurements where the scores' values do not matter."""
    generator = torch.Generator().manual_seed(seed)
    metrics = {}
    for layer, count in counts.items():
        score = torch.rand(count, generator=generator)
        frequency = torch.full((count,), 10, dtype=torch.int64)
        metrics[layer] = {
            "total_tokens": torch.tensor(10 * count), "expert_frequency": frequency,
            "pairwise_expert_frequency": frequency[:, None] + frequency[None, :], "ean_sum": score.double() * 10,
            "weighted_ean_sum": score.double() * 10, "weighted_expert_frequency_sum": torch.full((count,), 5.0).double(),
            "ean_mean": score, "reap": score, "max_activations": score,
        }
    return metrics
