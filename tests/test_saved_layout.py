"""Pruned folders keep their source checkpoint's layout and load in transformers 4.55 and 5.x.

Sources are tiny bf16 checkpoints saved by transformers 4.55 itself (``tests/stack_helper.py`` run in the
upstream venv, as real hub checkpoints are saved: per-expert tensors, sharded with an index), pruned
here with reap-fast under transformers 5.x. Each pruned folder is checked against its source (config
keys, tokenizer bytes, tensor names, dtypes, values) and loaded in both versions: the greedy tokens and
the last-position logits must agree with each other and with the source model pruned in memory by
:func:`reap_fast.prune.prune_model` (an independent slicing path).

The upstream venv is found through ``REAP_UPSTREAM_PYTHON`` (default ``.venv-upstream/bin/python``,
built by ``make venv-upstream``); without it the 4.55 tests skip and a 5.x-saved source is used for the
layout checks.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

from reap_fast.metrics import save_metrics
from reap_fast.prune import PruneConfig, prune_checkpoint, prune_model
from reap_fast.prune.__main__ import main as prune_main
from reap_fast.prune.checkpoint import COUNT_KEYS

sys.path.insert(0, str(Path(__file__).parent))
import stack_helper  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HELPER = Path(__file__).parent / "stack_helper.py"
FAMILIES = list(stack_helper.FAMILIES)
EXPERTS, PRUNED = 8, 2
WEIGHT_SUFFIXES = (".safetensors", "model.safetensors.index.json")


def upstream_python() -> tuple[str | None, str]:
    """(python of the transformers 4.55 venv, or None; the reason it is unusable)."""
    python = os.environ.get("REAP_UPSTREAM_PYTHON") or str(ROOT / ".venv-upstream" / "bin" / "python")
    if not os.access(python, os.X_OK):
        return None, f"no transformers 4.55 venv at {python} (run `make venv-upstream` or set REAP_UPSTREAM_PYTHON)"
    probe = subprocess.run([python, "-c", "import transformers; print(transformers.__version__)"],
                           capture_output=True, text=True, timeout=120)
    if probe.returncode != 0 or not probe.stdout.startswith("4.55"):
        return None, f"{python} does not import transformers 4.55 ({(probe.stdout or probe.stderr).strip()[-200:]})"
    return python, ""


def run_helper(python: str, *args: str) -> None:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([python, str(HELPER), *args], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def kept_by_score(layers: list[int], seed: int = 3) -> dict[int, list[int]]:
    """Synthetic REAP scores (a random permutation per layer) and the experts they keep (top E - PRUNED)."""
    generator = torch.Generator().manual_seed(seed)
    return {layer: torch.randperm(EXPERTS, generator=generator).tolist() for layer in layers}


def metrics_for(scores: dict[int, list[int]]) -> dict:
    metrics = {}
    for layer, order in scores.items():
        reap = torch.tensor(order, dtype=torch.float32) + 1.0
        metrics[layer] = {
            "total_tokens": torch.tensor(100, dtype=torch.int64),
            "expert_frequency": torch.full((EXPERTS,), 25, dtype=torch.int64),
            "pairwise_expert_frequency": torch.full((EXPERTS, EXPERTS), 50, dtype=torch.int64),
            "ean_sum": reap.double() * 25, "weighted_ean_sum": reap.double() * 25,
            "weighted_expert_frequency_sum": torch.full((EXPERTS,), 12.5, dtype=torch.float64),
            "ean_mean": reap.clone(), "reap": reap, "max_activations": reap.clone(),
        }
    return metrics


def moe_layers(source: Path) -> list[int]:
    names = weight_dtypes(source)
    return sorted({int(m.group(1)) for name in names if (m := re.search(r"layers\.(\d+)\..*experts\.", name))
                   and "shared_expert" not in name})


def weight_dtypes(folder: Path) -> dict[str, str]:
    dtypes = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            for name in handle.keys():
                dtypes[name] = handle.get_slice(name).get_dtype()
    return dtypes


def read_tensor(folder: Path, name: str) -> torch.Tensor:
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            if name in handle.keys():
                return handle.get_tensor(name)
    raise KeyError(name)


def expected_names(source_names, keep: dict[int, list[int]]) -> dict[str, str]:
    """{pruned name: source name}: removed experts dropped, kept ones renumbered in order."""
    mapping = {}
    for name in source_names:
        match = re.match(r"^(.*layers\.(\d+)\..*\.experts)\.(\d+)\.(.+)$", name)
        if match is None or int(match.group(2)) not in keep:
            mapping[name] = name
            continue
        kept = keep[int(match.group(2))]
        if int(match.group(3)) in kept:
            mapping[f"{match.group(1)}.{kept.index(int(match.group(3)))}.{match.group(4)}"] = name
    return mapping


@torch.no_grad()
def in_memory_pruned(source: Path, keep: dict[int, list[int]]) -> dict:
    """Greedy tokens and logits of the source loaded in fp32 and pruned in memory (independent of the writer)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    prune_model(model, {layer: torch.tensor(kept) for layer, kept in keep.items()})
    prompt = torch.tensor([stack_helper.PROMPT_IDS])
    logits = model(prompt).logits[0, -1]
    output = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=stack_helper.NEW_TOKENS,
                            min_new_tokens=stack_helper.NEW_TOKENS, do_sample=False, pad_token_id=257)
    return {"tokens": output[0, len(stack_helper.PROMPT_IDS):].tolist(), "logits": logits.tolist()}


def check_layout(source: Path, pruned: Path, keep: dict[int, list[int]]) -> None:
    """The pruned folder follows its source: config keys, side files, tensor names, dtypes and values."""
    source_config = json.loads((source / "config.json").read_text())
    pruned_config = json.loads((pruned / "config.json").read_text())
    assert list(pruned_config) == list(source_config)
    changed = {key for key in source_config if source_config[key] != pruned_config[key]}
    assert changed and changed <= set(COUNT_KEYS), changed
    assert all(pruned_config[key] == EXPERTS - PRUNED for key in changed)
    for path in source.iterdir():
        if path.is_file() and path.name != "config.json" and not path.name.endswith(WEIGHT_SUFFIXES):
            assert (pruned / path.name).read_bytes() == path.read_bytes(), path.name
    assert (pruned / "model.safetensors.index.json").is_file() == (source / "model.safetensors.index.json").is_file()
    if (pruned / "model.safetensors.index.json").is_file():
        index = json.loads((pruned / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"].values()) == {path.name for path in pruned.glob("*.safetensors")}
    source_dtypes, pruned_dtypes = weight_dtypes(source), weight_dtypes(pruned)
    mapping = expected_names(source_dtypes, keep)
    assert set(pruned_dtypes) == set(mapping)
    assert all(pruned_dtypes[name] == source_dtypes[mapping[name]] for name in pruned_dtypes)
    for layer, kept in keep.items():  # router rows and one expert tensor, by hand
        routers = [n for n in pruned_dtypes if f"layers.{layer}." in n and re.search(r"\.(gate|router)\.weight$", n)]
        assert len(routers) == 1, routers
        assert torch.equal(read_tensor(pruned, routers[0]), read_tensor(source, routers[0])[kept])
        expert = next(n for n in pruned_dtypes if re.search(rf"layers\.{layer}\..*experts\.(1\.|gate_up_proj$)", n))
        expected = read_tensor(source, mapping[expert])
        assert torch.equal(read_tensor(pruned, expert), expected if ".experts.1." in expert else expected[kept])


def reported_keep(pruned: Path) -> dict[int, list[int]]:
    report = json.loads((pruned / "pruned_experts.json").read_text())["layers"]
    return {int(layer): entry["kept"] for layer, entry in report.items()}


def prune_with_cli(source: Path, work: Path) -> tuple[Path, dict[int, list[int]]]:
    """`reap-fast prune`'s path (prune_checkpoint) on a synthetic observation file; (folder, kept experts)."""
    scores = kept_by_score(moe_layers(source))
    metrics_path = work / f"{source.name}-obs.pt"
    save_metrics(metrics_for(scores), metrics_path)
    pruned = prune_checkpoint(source, metrics_path, work / f"{source.name}-pruned",
                              PruneConfig(n_experts_to_prune=PRUNED))
    keep = reported_keep(pruned)
    assert set(keep) == set(scores) and all(len(kept) == EXPERTS - PRUNED for kept in keep.values())
    return pruned, keep


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Sources by 4.55, folders pruned by reap-fast, and every folder's generations in 4.55."""
    python, reason = upstream_python()
    if python is None:
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("stack")
    run_helper(python, "make", str(work / "sources"), *FAMILIES)
    cases = {}
    for family in FAMILIES:
        source = work / "sources" / family
        cases[family] = (source, *prune_with_cli(source, work))
    run_helper(python, "generate", str(work / "v455.json"), *(str(pruned) for _, pruned, _ in cases.values()))
    return cases, json.loads((work / "v455.json").read_text()), work, python


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_folder_keeps_source_layout(stack, family):
    source, pruned, keep = stack[0][family]
    assert json.loads((source / "config.json").read_text())["transformers_version"].startswith("4.55")
    check_layout(source, pruned, keep)


# transformers 4.55 and 5.x compute Llama-4 differently: on an UNPRUNED source their last-position logits
# already differ by 1.3e-2 (measured, fp32), so 4.55's logits are compared at that scale (tokens must agree).
VERSION_LOGIT_ATOL = {"llama4_text": 5e-2}


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_folder_generates_alike_in_455_and_5x(stack, family):
    source, pruned, keep = stack[0][family]
    old = stack[1][str(pruned)]
    assert old["version"].startswith("4.55")
    new = stack_helper.generate(pruned)
    reference = in_memory_pruned(source, keep)
    assert old["tokens"] == new["tokens"] == reference["tokens"]
    torch.testing.assert_close(torch.tensor(old["logits"]), torch.tensor(reference["logits"]), rtol=1e-4,
                               atol=VERSION_LOGIT_ATOL.get(family, 1e-4))
    torch.testing.assert_close(torch.tensor(new["logits"]), torch.tensor(reference["logits"]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layerwise", [False, True], ids=["prune", "layerwise_prune"])
def test_drop_in_output_loads_in_455_and_5x(stack, layerwise, tmp_path, monkeypatch):
    cases, _, work, python = stack
    source = cases["qwen3_moe"][0]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"document {i}: the quick brown fox {i * 7}."}) + "\n" for i in range(16)))
    monkeypatch.chdir(tmp_path)
    argv = ["--model_name", str(source), "--dataset_name", str(data), "--prune_method", "reap",
            "--compression_ratio", "0.25", "--seed", "7", "--model_max_length", "32", "--batch_size", "2",
            "--batches_per_category", "2", "--do_eval", "false"]
    if layerwise:
        from reap_fast.layerwise_prune import main as layerwise_main

        assert layerwise_main(argv) == 0
    else:
        assert prune_main(argv) == 0
    (pruned,) = [path.parent for path in (tmp_path / "artifacts").rglob("pruned_experts.json")]
    keep = reported_keep(pruned)
    check_layout(source, pruned, keep)
    assert set(weight_dtypes(pruned).values()) == {"BF16"}
    run_helper(python, "generate", str(tmp_path / "v455.json"), str(pruned))
    old = json.loads((tmp_path / "v455.json").read_text())[str(pruned)]
    new = stack_helper.generate(pruned)
    assert old["tokens"] == new["tokens"] == in_memory_pruned(source, keep)["tokens"]


def test_vllm_reads_the_pruned_config(stack):
    vllm = pytest.importorskip("vllm", reason="vllm is not installed (it needs CUDA; not installable on this machine)")
    from vllm.transformers_utils.config import get_config

    source, pruned, _ = stack[0]["qwen3_moe"]
    config = get_config(str(pruned), trust_remote_code=False)
    assert config.num_experts == EXPERTS - PRUNED, vllm.__version__


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_layout_kept_for_a_5x_saved_source(family, tmp_path):
    """Without the 4.55 venv too: a bf16, sharded source saved by this transformers keeps its layout."""
    source = tmp_path / family
    stack_helper.make_source(source, family)
    pruned, keep = prune_with_cli(source, tmp_path)
    check_layout(source, pruned, keep)
    assert stack_helper.generate(pruned)["tokens"] == in_memory_pruned(source, keep)["tokens"]


def test_load_model_keeps_the_checkpoint_dtype(tmp_path):
    from reap_fast.observe import load_model

    stack_helper.make_source(tmp_path / "bf16", "olmoe")
    model, _ = load_model(str(tmp_path / "bf16"), device="cpu")
    assert {param.dtype for param in model.parameters()} == {torch.bfloat16}
    model, _ = load_model(str(tmp_path / "bf16"), device="cpu", dtype="float32")
    assert {param.dtype for param in model.parameters()} == {torch.float32}


def test_prune_checkpoint_reads_no_weights_of_a_safetensors_source(tmp_path, monkeypatch):
    """The pruned folder is written from the source's files: the model's weights are never loaded."""
    import reap_fast.models.loading as loading

    def refuse(*args, **kwargs):
        raise AssertionError("load_model called")

    monkeypatch.setattr(loading, "load_model", refuse)
    source = tmp_path / "olmoe"
    stack_helper.make_source(source, "olmoe")
    pruned, keep = prune_with_cli(source, tmp_path)
    check_layout(source, pruned, keep)
