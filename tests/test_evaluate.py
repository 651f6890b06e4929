"""Held-out perplexity (reap_fast.evaluate): exact against a hand computation on controlled logits."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from reap_fast.data import CalibrationSet
from reap_fast.evaluate import EvalRows, pack_texts, perplexity
from reap_lab.tiny import byte_tokenizer


class TableModel(torch.nn.Module):
    """logits[b, t] = table[input_ids[b, t]] (+ an optional per-position offset): fully controlled."""

    def __init__(self, table: torch.Tensor, position_bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(table.clone())
        self.position_bias = position_bias
        self.calls = []

    def forward(self, input_ids, attention_mask=None):
        self.calls.append((input_ids.clone(), None if attention_mask is None else attention_mask.clone()))
        logits = self.table[input_ids]
        if self.position_bias is not None:
            logits = logits + self.position_bias[: input_ids.shape[1]].unsqueeze(0).unsqueeze(-1)
        return SimpleNamespace(logits=logits)


def manual(logits_rows, ids, attention, stats):
    """The counting rule written out with Python floats: target t+1 counts if stats[t+1] and attention[t].

    ``logits_rows[row][t]`` are the model's logits at position t (as the model computed them).
    """
    nll, hits, count = 0.0, 0, 0
    for row in range(len(ids)):
        for t in range(len(ids[row]) - 1):
            if not (stats[row][t + 1] and attention[row][t]):
                continue
            logits = [float(v) for v in logits_rows[row][t]]
            top = max(logits)
            log_z = top + math.log(sum(math.exp(v - top) for v in logits))
            target = ids[row][t + 1]
            nll += log_z - logits[target]
            hits += int(logits.index(max(logits)) == target)
            count += 1
    return math.exp(nll / count), hits / count, count


def test_uniform_logits_give_vocabulary_size():
    vocab = 7
    model = TableModel(torch.zeros(vocab, vocab))
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0]])
    attention = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    stats = attention.bool()
    result = perplexity(model, None, EvalRows(ids, attention, stats), batch_size=1)
    assert result["perplexity"] == pytest.approx(vocab, rel=1e-12)
    assert result["tokens"] == 3 + 1  # 3 targets in row 0, 1 in row 1 (padding is never a target)
    # argmax of equal logits is id 0; only a target equal to 0 would count, and padding is excluded
    assert result["next_token_accuracy"] == 0.0


def test_matches_manual_log_softmax_on_calibration_set_masks():
    generator = torch.Generator().manual_seed(0)
    vocab = 11
    table = torch.randn(vocab, vocab, generator=generator) * 3
    bias = torch.randn(8, generator=generator)
    ids = torch.randint(0, vocab, (5, 8), generator=generator)
    attention = torch.ones(5, 8, dtype=torch.long)
    attention[3, 5:] = 0  # padding at the end of a row
    attention[4, 2:] = 0
    stats = attention.bool().clone()
    stats[0, 3] = False  # separators: attended, not counted
    stats[2, 6] = False
    stats[1, 0] = False
    calibration = CalibrationSet(ids, attention, stats, ["x"] * 5)
    model = TableModel(table, bias)
    logits = model(ids).logits.detach()  # float32, exactly what the evaluation sees
    model.calls.clear()
    result = perplexity(model, None, calibration, batch_size=2)
    ppl, accuracy, count = manual(logits.tolist(), ids.tolist(), attention.tolist(), stats.tolist())
    # 35 (position, next) pairs minus 3 + 6 padded targets and 2 separator targets (position 0 is never a target)
    assert count == 5 * 7 - 3 - 6 - 2
    assert result["tokens"] == count
    assert result["perplexity"] == pytest.approx(ppl, rel=1e-12)
    assert result["next_token_accuracy"] == pytest.approx(accuracy)
    # every batch size gives the same token-weighted result
    again = perplexity(model, None, calibration, batch_size=5)
    assert again["perplexity"] == pytest.approx(result["perplexity"], rel=1e-12)
    assert again["tokens"] == result["tokens"]
    # the model saw the attention mask
    assert model.calls and all(mask is not None for _, mask in model.calls)


def test_perfect_predictor_and_accuracy():
    vocab = 5
    table = torch.full((vocab, vocab), -30.0)
    for token in range(vocab):  # predicts token + 1 (mod vocab) with near certainty
        table[token, (token + 1) % vocab] = 30.0
    ids = torch.tensor([[0, 1, 2, 4, 0]])  # 0->1 ok, 1->2 ok, 2->4 wrong, 4->0 ok
    rows = EvalRows(ids, torch.ones_like(ids), torch.ones_like(ids, dtype=torch.bool))
    result = perplexity(TableModel(table), None, rows)
    assert result["next_token_accuracy"] == pytest.approx(3 / 4)
    assert result["tokens"] == 4
    ppl, _, _ = manual(table[ids].tolist(), ids.tolist(), [[1] * 5], [[True] * 5])
    assert result["perplexity"] == pytest.approx(ppl, rel=1e-12)


def test_pack_texts_rule():
    tokenizer = byte_tokenizer()
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    rows = pack_texts(["ab", "cde"], tokenizer, seq_len=4)
    a, b, c, d, e = (ord(ch) for ch in "abcde")
    assert rows.input_ids.tolist() == [[a, b, eos, c], [d, e, pad, pad]]
    assert rows.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert rows.stats_mask.tolist() == [[True, True, False, True], [True, True, False, False]]
    # targets: b (after a), c (after the separator), e (after d) -> 3
    result = perplexity(TableModel(torch.zeros(264, 264)), tokenizer, ["ab", "cde"], seq_len=4)
    assert result["tokens"] == 3
    assert result["perplexity"] == pytest.approx(264)


def test_deterministic_and_restores_training_mode():
    tokenizer = byte_tokenizer()
    model = TableModel(torch.randn(264, 264, generator=torch.Generator().manual_seed(1)))
    model.train()
    texts = ["hello world", "def f(x):\n    return x"]
    first = perplexity(model, tokenizer, texts, seq_len=8, batch_size=3)
    second = perplexity(model, tokenizer, texts, seq_len=8, batch_size=3)
    assert first == second
    assert model.training
    assert model.table.grad is None


def test_errors():
    tokenizer = byte_tokenizer()
    model = TableModel(torch.zeros(264, 264))
    with pytest.raises(ValueError, match="tokenizer"):
        perplexity(model, None, ["text"], seq_len=8)
    with pytest.raises(ValueError, match="no target"):
        ids = torch.tensor([[1, 2]])
        perplexity(model, None, EvalRows(ids, torch.ones_like(ids), torch.zeros_like(ids, dtype=torch.bool)))
    with pytest.raises(ValueError, match="seq_len"):
        pack_texts(["x"], tokenizer, seq_len=1)


def test_real_model_runs():
    from reap_lab.tiny import build_model, tiny_qwen3_moe_config

    model = build_model(tiny_qwen3_moe_config(num_hidden_layers=1, num_experts=4), seed=0)
    tokenizer = byte_tokenizer()
    result = perplexity(model, tokenizer, ["The quick brown fox.", "import os\nprint(os.sep)"], seq_len=16, batch_size=2)
    # 43 document bytes in a 44-token stream (one separator) cut into rows of 16: the first token of each
    # of the 3 rows has no context and is not a target
    assert result["tokens"] == 20 + 23 - 3
    assert 1 < result["perplexity"] < 1e6


# --- the stage's settings and its child process ----------------------------------------------------------


def test_eval_config_defaults_and_range_checks():
    from dataclasses import FrozenInstanceError

    from reap_fast.config import ConfigError, EvalConfig

    config = EvalConfig()
    assert (config.dataset, config.samples, config.max_length, config.batch_size, config.harness) == (
        None, 16, 512, 8, None)
    for overrides, message in [(dict(samples=0), r"^samples must be in \[1, inf\)"),
                               (dict(max_length=1), r"^max_length must be in \[2, inf\)"),
                               (dict(batch_size=0), "^batch_size"), (dict(harness="arc_easy"), "HarnessSettings")]:
        with pytest.raises(ConfigError, match=message):
            EvalConfig(**overrides)
    with pytest.raises(FrozenInstanceError):
        config.samples = 4


def test_run_refuses_bad_eval_settings_before_any_work(tmp_path, capsys):
    from reap_fast.cli import main

    output = tmp_path / "run"
    code = main(["run", "--model", str(tmp_path / "no-model"), "--dataset", "x.jsonl", "--eval-dataset", "y.jsonl",
                 "--eval-max-length", "1", "--output", str(output)])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "reap-fast run: error: --eval-max-length must be in [2, inf), got 1"]
    assert not output.exists()


def test_a_refusal_in_the_child_comes_back_as_one_line(tmp_path):
    import json

    from reap_fast.config import EvalConfig
    from reap_fast.evaluate import EvalError
    from reap_fast.evaluate.heldout import perplexity_in_child
    from reap_lab.tiny import make_tiny_checkpoint

    model = make_tiny_checkpoint(tmp_path / "model", num_hidden_layers=1)
    texts_file = tmp_path / "texts.json"
    texts_file.write_text(json.dumps(["", ""]))
    with pytest.raises(EvalError) as raised:
        perplexity_in_child(str(model), texts_file, EvalConfig(max_length=16))
    assert str(raised.value) == f"evaluation of {model} failed: no non-empty texts to evaluate"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model", "texts.json"]  # no result file left
