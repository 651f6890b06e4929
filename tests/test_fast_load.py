"""The fast loader (safetensors read straight into the fused layout) gives exactly transformers' own load:
every tensor (values, dtype, shape), every buffer, tied weights and the logits, for every family."""

import pytest
import torch
from reap_lab.families_tiny import tiny_family_config
from reap_lab.tiny import build_model, byte_tokenizer, make_tiny_checkpoint, save_checkpoint
from reap_fast.models import ADAPTERS
from reap_fast.models.fast_load import load_weights
from reap_fast.models.loading import load_config, load_model
from transformers import AutoModelForCausalLM


def _assert_same_model(fast, reference):
    assert fast is not None
    ours, theirs = fast.state_dict(), reference.state_dict()
    assert list(ours) == list(theirs)
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype and ours[name].shape == tensor.shape, name
        assert torch.equal(ours[name], tensor), name
    buffers = dict(reference.named_buffers())
    for name, buffer in fast.named_buffers():
        assert torch.equal(buffer, buffers[name]), name
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(fast(input_ids=ids).logits, reference(input_ids=ids).logits)


@pytest.mark.parametrize("family", [adapter.family for adapter in ADAPTERS])
def test_fast_load_equals_from_pretrained(family, tmp_path):
    model = build_model(tiny_family_config(family, layers=2), seed=1)
    path = save_checkpoint(model, byte_tokenizer(), tmp_path / family)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    _assert_same_model(load_weights(path, load_config(str(path)), torch.float32), reference)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_bf16_checkpoint_as_stored_and_converted_with_tied_embeddings(dtype, tmp_path):
    model = build_model(load_config(str(make_tiny_checkpoint(tmp_path / "cfg", tie_word_embeddings=True))),
                        seed=2, dtype=torch.bfloat16)
    path = save_checkpoint(model, byte_tokenizer(), tmp_path / "bf16")
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    fast = load_weights(path, load_config(str(path)), dtype)
    _assert_same_model(fast, reference)
    assert fast.lm_head.weight is fast.model.embed_tokens.weight


def test_load_model_uses_it_and_falls_back(tmp_path, monkeypatch, caplog):
    path = make_tiny_checkpoint(tmp_path / "tiny", seed=0)
    model, _ = load_model(str(path), device="cpu", dtype="float32")
    assert model.generation_config is not None
    calls = []
    monkeypatch.setattr("reap_fast.models.loading.load_weights", lambda *a: calls.append(a))  # returns None
    fallback, _ = load_model(str(path), device="cpu", dtype="float32")
    assert calls
    _assert_same_model(model, fallback)
