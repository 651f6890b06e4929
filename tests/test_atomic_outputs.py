"""Outputs are replaced atomically: a write that fails half-way leaves the previous file untouched. fileio's texts
file loader (the children's texts files)."""

from __future__ import annotations

import pytest
import torch

from reap_fast.errors import UsageError
from reap_fast.fileio import atomic_write, atomic_write_json, load_texts_file
from reap_fast.metrics import load_metrics, save_metrics


class Interrupted(Exception):
    pass


def test_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "results.json"
    atomic_write_json({"run": 1}, path)
    before = path.read_bytes()

    def write(handle):
        handle.write(b'{"run": 2, "trunc')
        raise Interrupted

    with pytest.raises(Interrupted):
        atomic_write(path, write)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]  # no temporary file left


def test_failed_observation_save_keeps_the_previous_file(tmp_path, monkeypatch):
    metrics = {0: {
        "total_tokens": torch.tensor(3), "expert_frequency": torch.tensor([2, 1]),
        "pairwise_expert_frequency": torch.tensor([[4, 3], [3, 2]]), "ean_sum": torch.tensor([15.0, 13.0], dtype=torch.float64),
        "weighted_ean_sum": torch.tensor([12.75, 10.4], dtype=torch.float64),
        "weighted_expert_frequency_sum": torch.tensor([1.65, 0.8], dtype=torch.float64),
        "ean_mean": torch.tensor([7.5, 13.0]), "reap": torch.tensor([6.375, 10.4]), "max_activations": torch.tensor([8.0, 12.0]),
    }}
    path = tmp_path / "obs.pt"
    save_metrics(metrics, path)
    before = path.read_bytes()
    real_save = torch.save

    def half_save(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 half a zip")
        raise Interrupted

    monkeypatch.setattr(torch, "save", half_save)
    with pytest.raises(Interrupted):
        save_metrics(metrics, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == before
    assert torch.equal(load_metrics(path)[0]["reap"], metrics[0]["reap"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["obs.pt"]


def test_texts_file_is_a_json_list_or_an_object_with_texts(tmp_path):
    assert load_texts_file(atomic_write_json(["a", "b c"], tmp_path / "list.json")) == ["a", "b c"]
    assert load_texts_file(atomic_write_json({"texts": ["d"], "note": 1}, tmp_path / "object.json")) == ["d"]
    (tmp_path / "broken.json").write_text('["a", ')
    refusals = {
        tmp_path / "missing.json": "texts file not found: ",
        tmp_path / "broken.json": "texts file is not valid JSON: ",
        atomic_write_json(["a", 1], tmp_path / "mixed.json"): "texts file must hold a JSON list of strings",
        atomic_write_json({"rows": ["a"]}, tmp_path / "no-texts.json"): "texts file must hold a JSON list of strings",
        atomic_write_json("a", tmp_path / "string.json"): "texts file must hold a JSON list of strings",
    }
    for path, message in refusals.items():
        with pytest.raises(UsageError) as raised:
            load_texts_file(path)
        assert str(raised.value).startswith(message) and "\n" not in str(raised.value), path
