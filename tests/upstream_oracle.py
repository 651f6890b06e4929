"""Run Cerebras REAP's own ``prune.py`` / ``layerwise_prune.py``, unchanged, as the oracle of the drop-in.

Upstream runs in its own environment (Python with transformers 4.55, ``datasets<4`` and its other
dependencies): ``REAP_UPSTREAM_PYTHON`` names that interpreter (default ``.venv-upstream/bin/python`` in
the repository). Its source comes from ``REAP_UPSTREAM_SRC``: a folder holding ``src/reap`` or a bare git
repository (default: the snapshot ``/work/.mirror/CerebrasResearch+reap/repo``), exported at ``HEAD``.

What the harness adds around upstream, and nothing else:

* empty stand-ins for ``vllm``, ``lm_eval`` and ``evalplus`` (imported at module level, never called when
  pruning with ``--do_eval false``);
* at HEAD, ``prune.py`` passes its argument dataclasses to ``dump_args_to_yaml`` positionally, which raises
  ``TypeError`` after the model is saved; the driver gives that call the names it expects;
* offline data: the chat dataset is a local folder ``theblackcat102/evol-codealpaca-v1/train.jsonl`` in the
  working directory (``datasets.load_dataset`` reads a local folder of that name). Upstream's only
  plain-text dataset, ``allenai/c4``, is read from a fixed hub URL that cannot be served offline, so the
  driver registers upstream's own C4 processor class under a second name, ``local/plain-text``, a local
  folder of C4-like rows (``text``, ``timestamp``, ``url``); reap-fast reads that folder as any local
  dataset (its ``text`` column).
"""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SNAPSHOT = "/work/.mirror/CerebrasResearch+reap/repo"
CHAT_DATASET = "theblackcat102/evol-codealpaca-v1"
TEXT_DATASET = "local/plain-text"

_STUBS = {
    "vllm/__init__.py": "class TokensPrompt(dict):\n    pass\n",
    "vllm/entrypoints/__init__.py": "",
    "vllm/entrypoints/openai/__init__.py": "",
    "vllm/entrypoints/openai/api_server.py": "def run_server(*args, **kwargs):\n    raise RuntimeError('vllm stub')\n",
    "vllm/engine/__init__.py": "",
    "vllm/engine/arg_utils.py": "class AsyncEngineArgs:\n    pass\n",
    "lm_eval/__init__.py": "",
    "lm_eval/evaluator.py": "",
    "lm_eval/utils.py": "def make_table(*args, **kwargs):\n    return ''\n",
    "evalplus/__init__.py": "",
    "evalplus/evaluate.py": "def evaluate(*args, **kwargs):\n    raise RuntimeError('evalplus stub')\n",
}

_DRIVER = '''"""Run an upstream entry point unchanged, naming the arguments of HEAD's dump_args_to_yaml calls."""
import runpy
import sys

import reap.data
import reap.main

# Upstream's plain-text processor (C4's) for the local plain-text folder; upstream's logic is untouched.
reap.data.DATASET_REGISTRY["local/plain-text"] = reap.data.DATASET_REGISTRY["allenai/c4"]
_dump = reap.main.dump_args_to_yaml
_SECTIONS = {  # the order each entry point passes its argument dataclasses in
    "reap.main": ("reap_args", "model_args", "ds_args", "obs_args", "cluster_args", "kd_args", "eval_args",
                  "merge_args"),
    "default": ("reap_args", "ds_args", "obs_args", "model_args", "eval_args", "prune_args", "cluster_args"),
}
entry = sys.argv[1]


def dump_args_to_yaml(pruned_model_dir, *sections, **named):
    names = _SECTIONS.get(entry, _SECTIONS["default"])
    return _dump(pruned_model_dir, **dict(zip(names, sections)), **named)


reap.main.dump_args_to_yaml = dump_args_to_yaml
sys.argv = [entry] + sys.argv[2:]
if entry == "reap.main":  # the merging entry point: its own module, so main() sees the named call
    reap.main.main()
else:
    runpy.run_module(entry, run_name="__main__", alter_sys=True)
'''

_BUILDER = '''"""Build the tiny Qwen3-MoE checkpoint with upstream's transformers (4.55) so both stacks read it."""
import sys

import torch
from transformers import AutoModelForCausalLM

from reap_lab.tiny import byte_tokenizer, tiny_qwen3_moe_config

folder, seed = sys.argv[1], int(sys.argv[2])
torch.manual_seed(seed)
config = tiny_qwen3_moe_config(num_hidden_layers=3, num_experts=8, num_experts_per_tok=2)
model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
generator = torch.Generator().manual_seed(seed + 1)
with torch.no_grad():
    for name, param in model.named_parameters():
        if name.endswith("mlp.gate.weight"):
            param.copy_(torch.randn(param.shape, generator=generator))
model.save_pretrained(folder)
byte_tokenizer().save_pretrained(folder)
'''


@dataclass(frozen=True)
class Upstream:
    """A runnable upstream: its interpreter, its exported source and the stand-in modules."""

    python: Path
    source: Path  # holds src/reap
    stubs: Path


def find_upstream(workdir: Path) -> Upstream | str:
    """The upstream environment, prepared under ``workdir``, or the reason it cannot be used."""
    python = Path(os.environ.get("REAP_UPSTREAM_PYTHON") or REPO / ".venv-upstream/bin/python")
    if not python.is_file():
        return f"no upstream interpreter at {python} (set REAP_UPSTREAM_PYTHON or build .venv-upstream)"
    check = subprocess.run(
        [str(python), "-c", "import transformers, datasets, accelerate, yaml; print(transformers.__version__)"],
        capture_output=True, text=True,
    )
    if check.returncode != 0:
        return f"the upstream interpreter {python} lacks transformers/datasets/accelerate"
    snapshot = Path(os.environ.get("REAP_UPSTREAM_SRC") or DEFAULT_SNAPSHOT)
    source = workdir / "upstream"
    if (snapshot / "src/reap").is_dir():
        source = snapshot
    elif (snapshot / "HEAD").is_file():
        archive = subprocess.run(
            ["git", "--git-dir", str(snapshot), "archive", "HEAD", "src"], capture_output=True, check=False
        )
        if archive.returncode != 0:
            return f"cannot export src/ from the upstream snapshot {snapshot}"
        source.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            tar.extractall(source)
    else:
        return f"no upstream REAP source at {snapshot} (set REAP_UPSTREAM_SRC)"
    stubs = workdir / "stubs"
    for relative, text in _STUBS.items():
        path = stubs / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (stubs / "upstream_driver.py").write_text(_DRIVER)
    (stubs / "build_tiny.py").write_text(_BUILDER)
    return Upstream(python, source, stubs)


def _offline_env(workdir: Path, stack: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HUB_CACHE=str(workdir / "hub"),
        HF_DATASETS_CACHE=str(workdir / f"datasets-cache-{stack}"),
        TOKENIZERS_PARALLELISM="false",
        PYTHONHASHSEED="0",
    )
    return env


def build_checkpoint(upstream: Upstream, folder: Path, seed: int = 0) -> Path:
    """The tiny Qwen3-MoE (3 layers, 8 experts, top-2) saved by upstream's transformers."""
    env = _offline_env(folder.parent, "build")
    env["PYTHONPATH"] = str(REPO)
    subprocess.run([str(upstream.python), str(upstream.stubs / "build_tiny.py"), str(folder), str(seed)], env=env,
                   check=True, capture_output=True)
    return folder


def _words(rng: random.Random, count: int) -> str:
    vocabulary = "alpha beta gamma delta def return class import value list print loop index sum data".split()
    return " ".join(rng.choice(vocabulary) for _ in range(count))


def write_datasets(workdir: Path, rows: int = 40) -> None:
    """The chat and the plain-text dataset folders in ``workdir``."""
    rng = random.Random(1234)
    chat = workdir / CHAT_DATASET / "train.jsonl"
    chat.parent.mkdir(parents=True, exist_ok=True)
    with open(chat, "w") as handle:
        for i in range(rows):
            row = {"instruction": f"task {i}: " + _words(rng, rng.randint(1, 4)), "output": _words(rng, rng.randint(1, 10))}
            handle.write(json.dumps(row) + "\n")
    text = workdir / TEXT_DATASET / "train.jsonl"
    text.parent.mkdir(parents=True, exist_ok=True)
    with open(text, "w") as handle:
        for i in range(rows):
            row = {"text": f"Document {i}. " + _words(rng, rng.randint(1, 14)), "timestamp": "2019-04-25", "url": f"u{i}"}
            handle.write(json.dumps(row) + "\n")


def _upstream_command(upstream: Upstream, cwd: Path, argv: list[str], entry: str) -> tuple[list[str], dict]:
    env = _offline_env(cwd.parent, "upstream")
    env["PYTHONPATH"] = os.pathsep.join([str(upstream.stubs), str(upstream.source / "src")])
    return [str(upstream.python), str(upstream.stubs / "upstream_driver.py"), entry, *argv], env


def _dropin_command(cwd: Path, argv: list[str], layerwise: bool) -> tuple[list[str], dict]:
    env = _offline_env(cwd.parent, "reap-fast")
    env["PYTHONPATH"] = str(REPO)
    module = "reap_fast.layerwise_prune" if layerwise else "reap_fast.prune"
    return [sys.executable, "-m", module, *argv], env


@dataclass(frozen=True)
class Finished:
    """A finished process: exit status and output."""

    returncode: int
    stdout: str
    stderr: str


def run_both(upstream: Upstream, cwds: tuple[Path, Path], argv: list[str], layerwise: bool) -> tuple[Finished, Finished]:
    """Upstream's entry point in ``cwds[0]`` and the drop-in in ``cwds[1]``, at the same time, same flags."""
    entry = "reap.layerwise_prune" if layerwise else "reap.prune"
    commands = [_upstream_command(upstream, cwds[0], argv, entry), _dropin_command(cwds[1], argv, layerwise)]
    results = _run_together(commands, cwds)
    return results[0], results[1]


def _run_together(commands: list[tuple[list[str], dict]], cwds: tuple[Path, ...]) -> list[Finished]:
    processes = [
        subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for (command, env), cwd in zip(commands, cwds)
    ]
    results = []
    for process in processes:
        stdout, stderr = process.communicate()
        results.append(Finished(process.returncode, stdout, stderr))
    return results


def run_upstream(upstream: Upstream, cwd: Path, argv: list[str], entry: str) -> Finished:
    """One upstream entry point (``reap.prune``, ``reap.layerwise_prune``, ``reap.main``) in ``cwd``."""
    return _run_together([_upstream_command(upstream, cwd, argv, entry)], (cwd,))[0]


def run_dropin(cwd: Path, argv: list[str], layerwise: bool) -> Finished:
    """The drop-in's ``prune`` (or ``layerwise_prune``) in ``cwd``."""
    return _run_together([_dropin_command(cwd, argv, layerwise)], (cwd,))[0]


# Upstream's cosine distances (merging statistics): computed in fp32, so d(x, x) on the diagonal is rounding
# noise of a few 1e-7 there (reap-fast's float64 gives ~1e-15); they are compared with 1e-6 absolute slack.
DISTANCE_KEYS = ("ttm_similarity_matrix", "online_characteristic_activation_dist", "router_logit_similiarity")


def compare_observations(ours: dict, theirs: dict, rtol: float = 1e-4) -> list[str]:
    """Differences between two observation files: every key of ``ours`` must be in ``theirs``, integer keys
    equal, floating keys within ``rtol`` relative (plus 1e-7 absolute for values at zero, 1e-6 for the
    cosine distances of :data:`DISTANCE_KEYS`)."""
    problems = []
    if sorted(ours) != sorted(theirs):
        return [f"layers differ: {sorted(ours)} vs {sorted(theirs)}"]
    for layer in sorted(ours):
        for key, value in ours[layer].items():
            other = theirs[layer].get(key)
            if other is None:
                problems.append(f"layer {layer}: upstream has no {key}")
                continue
            value = torch.as_tensor(value)
            other = other if torch.is_tensor(other) else torch.as_tensor(other.mean)  # upstream's running-mean tracker
            if value.dtype in (torch.int64, torch.int32):
                if not torch.equal(value.long(), other.long()):
                    problems.append(f"layer {layer} {key}: {value.tolist()} vs {other.tolist()}")
            elif not torch.allclose(value.double(), other.double(), rtol=rtol, atol=1e-6 if key in DISTANCE_KEYS else 1e-7):
                worst = ((value.double() - other.double()).abs() / other.double().abs().clamp_min(1e-12)).max()
                problems.append(f"layer {layer} {key}: worst relative difference {float(worst):.3g}")
    return problems


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def _down_projections(tensors: dict[str, torch.Tensor], layer: int) -> list[torch.Tensor]:
    """Each expert's down projection in ``layer``, from per-expert or fused checkpoint names."""
    prefix = f"model.layers.{layer}.mlp.experts."
    fused = tensors.get(prefix + "down_proj")
    if fused is not None:
        return list(fused.unbind(0))
    count = sum(1 for name in tensors if name.startswith(prefix) and name.endswith(".down_proj.weight"))
    return [tensors[f"{prefix}{index}.down_proj.weight"] for index in range(count)]


def kept_experts(pruned: Path, original: Path, layers: list[int]) -> dict[int, list[int]]:
    """For each layer, the original expert each pruned slot holds (bitwise-equal weights), -1 if none;
    the router rows are checked to be the original rows of those experts."""
    ours, source = _weights(pruned), _weights(original)
    kept = {}
    for layer in layers:
        originals = _down_projections(source, layer)
        slots = []
        for tensor in _down_projections(ours, layer):
            match = [i for i, o in enumerate(originals) if o.shape == tensor.shape and torch.equal(o, tensor)]
            match += [i for i, o in enumerate(originals) if o.shape == tensor.T.shape and torch.equal(o, tensor.T)]
            slots.append(match[0] if match else -1)
        router = f"model.layers.{layer}.mlp.gate.weight"
        if not torch.equal(ours[router], source[router][slots]):
            slots = [-2] * len(slots)  # router rows do not follow the kept experts
        kept[layer] = slots
    return kept
