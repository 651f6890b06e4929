"""AutoRound W4A16 stage (reap_fast.quantize), CPU only.

The test model's expert and attention weights lie exactly on auto-round's symmetric int4 grid (per
group of 128 input features: weight = s * q with s a power of two and integer codes q in [-8, 7],
each group holding at least one -8 so that auto-round's scale max|w| / 8 recovers s exactly). So
4-bit quantization is lossless, and the saved codes/scales can be compared exactly with the source
weights, expert by expert. Everything that imports or constructs AutoRound runs in child processes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from reap_fast import quantize as q
from reap_fast.config import QuantConfig
from reap_fast.fileio import sha256_file
from reap_fast.models.memory_plan import MemoryPlanError
from reap_fast.outputs import OutputError, write_marker
from reap_fast.preflight import ModelFolderError
from reap_lab.tiny import build_model, byte_tokenizer, save_checkpoint, tiny_qwen3_moe_config
from reap_fast.quantize import autoround, worker

pytestmark = pytest.mark.skipif(
    __import__("importlib").util.find_spec("auto_round") is None, reason="auto-round not installed"
)

REPO = Path(__file__).resolve().parents[1]
GROUP = 128
SEQLEN = 64
LAYERS, EXPERTS = 2, 4
QUANTIZED_2D = ("q_proj", "k_proj", "v_proj", "o_proj")


def grid_config(**overrides):
    settings = dict(
        hidden_size=128,
        moe_intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_experts=EXPERTS,
        num_experts_per_tok=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,  # o_proj in-features 4 * 32 = 128
    )
    settings.update(overrides)
    return tiny_qwen3_moe_config(**settings)


def on_int4_grid(shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """Weights s * q, groups of 128 along the last (input) dim, s = 2**-k, q in [-8, 7], one -8 per group."""
    *rows, cols = shape
    n_rows = int(torch.tensor(rows).prod()) if rows else 1
    groups = cols // GROUP
    codes = torch.randint(-8, 8, (n_rows, groups, GROUP), generator=generator)
    # codes in [-8, 7] with a -8 at one random place per group: max |w| = 8 s is reached on the
    # negative side only, so auto-round's signed max-abs scale is +s and every code round-trips.
    where = torch.randint(0, GROUP, (n_rows, groups, 1), generator=generator)
    codes.scatter_(2, where, -8)
    exponents = torch.randint(6, 9, (n_rows, groups, 1), generator=generator)
    scales = torch.pow(2.0, -exponents.float())
    return (codes.float() * scales).reshape(shape)


def build_grid_model(seed: int = 0):
    model = build_model(grid_config(), seed=seed)
    generator = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            quantized = ".layers." in name and (
                any(f"self_attn.{p}." in name for p in QUANTIZED_2D) or ".mlp.experts." in name
            )
            if quantized:
                param.copy_(on_int4_grid(param.shape, generator))
            else:  # embeddings, norms, routers, lm_head: exact in float16 too
                param.copy_(param.half().float())
    return model.eval()


def calibration_texts(count: int = 12, length: int = 160) -> list[str]:
    words = "the quick brown fox jumps over a lazy dog while experts route tokens to their gates".split()
    texts = []
    for i in range(count):
        rotated = words[i % len(words) :] + words[: i % len(words)]
        text = " ".join(rotated)
        while len(text) < length:
            text += " " + text
        texts.append(text[:length])
    return texts


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    model = build_grid_model()
    source = save_checkpoint(model, byte_tokenizer(), root / "source")
    output = root / "out" / "w4a16"
    config = QuantConfig(iters=0, nsamples=8, seqlen=SEQLEN, batch_size=4, device="cpu", group_size=GROUP, bits=4)
    result = q.run_quantize_subprocess(source, output, calibration_texts(), config, capture_output=True, timeout=240)
    return {"model": model, "source": source, "output": result, "root": root}


# ---------------------------------------------------------------- end-to-end (one quantization run)


def test_output_is_complete_and_atomic(quantized):
    out = quantized["output"]
    assert out.is_dir()
    marker = json.loads((out / q.MARKER_FILE).read_text())
    assert marker["complete"] is True
    assert marker["auto_round_version"] == __import__("importlib").metadata.version("auto-round")
    settings = marker["settings"]
    assert (settings["bits"], settings["group_size"], settings["sym"], settings["iters"]) == (4, 128, True, 0)
    assert set(marker["weight_files"]) == {p.name for p in out.glob("*.safetensors")}
    assert q.is_complete_output(out)
    # tokenizer saved with the model
    assert (out / "tokenizer.json").exists() and (out / "tokenizer_config.json").exists()
    # no staging / scratch folders left next to it, nothing written into the cwd
    assert sorted(p.name for p in out.parent.iterdir()) == ["w4a16"]
    assert not (Path.cwd() / "ar_work_space").exists()
    # the parent process's transformers classes were not patched
    import transformers.models.qwen3_moe.modeling_qwen3_moe as qwen3_moe

    assert qwen3_moe.Qwen3MoeSparseMoeBlock.__module__ == qwen3_moe.__name__
    assert type(quantized["model"].model.layers[0].mlp.experts).__name__ == "Qwen3MoeExperts"


def test_disk_estimate_matches_the_quantized_folder(quantized):
    """The pre-flight estimate of the W4A16 folder (bits, group size) is within 15 % above what AutoRound wrote."""
    from reap_fast.fileio import size_on_disk
    from reap_fast.models.disk_estimate import written_bytes

    estimate = written_bytes(quantized["source"], quantization=(4, GROUP))
    written = size_on_disk(quantized["output"])
    assert written <= estimate <= 1.15 * written, (estimate, written)


def test_quantization_config(quantized):
    qcfg = json.loads((quantized["output"] / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "auto-round"
    assert (qcfg["bits"], qcfg["group_size"], qcfg["sym"]) == (4, 128, True)
    assert qcfg["data_type"] == "int"
    assert qcfg["packing_format"] == "auto_round:auto_gptq"
    # routers: kept at 16 bit in extra_config, stored as plain weights
    extra = qcfg.get("extra_config", {})
    for layer in range(LAYERS):
        key = next(k for k in extra if f"layers\\.{layer}\\.mlp\\.gate" in k or f"layers.{layer}.mlp.gate" in k)
        assert extra[key]["bits"] == 16
    with safe_open(str(quantized["output"] / "model.safetensors"), framework="pt") as handle:
        names = set(handle.keys())
        for layer in range(LAYERS):
            router = f"model.layers.{layer}.mlp.gate"
            assert f"{router}.weight" in names and f"{router}.qweight" not in names
            source = quantized["model"].model.layers[layer].mlp.gate.weight
            assert torch.equal(handle.get_tensor(f"{router}.weight").float(), source)


def _float_dtypes(folder: Path) -> dict[str, set[torch.dtype]]:
    """Dtypes of the floating tensors of a saved folder: the packed scales apart from everything else."""
    found: dict[str, set[torch.dtype]] = {"scales": set(), "unquantized": set()}
    for shard in folder.glob("*.safetensors"):
        for name, tensor in load_file(str(shard)).items():
            if tensor.is_floating_point():
                found["scales" if name.endswith(".scales") else "unquantized"].add(tensor.dtype)
    return found


def test_saved_dtype_is_the_sources_by_default(quantized):
    """auto-round would save a float32 source as a 'bfloat16' config holding float32 tensors (issue 24): by
    default the config and every unquantized tensor keep the source's dtype; scales stay float16."""
    source_dtype = next(iter(load_file(str(quantized["source"] / "model.safetensors")).values())).dtype
    assert json.loads((quantized["output"] / "config.json").read_text())["dtype"] == str(source_dtype).split(".")[-1]
    assert _float_dtypes(quantized["output"]) == {"scales": {torch.float16}, "unquantized": {source_dtype}}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_the_asked_dtype_is_what_is_saved(quantized, tmp_path, dtype):
    import shutil

    folder = tmp_path / "w4a16"
    shutil.copytree(quantized["output"], folder)
    autoround.cast_unquantized(folder, dtype)
    assert json.loads((folder / "config.json").read_text())["dtype"] == dtype
    assert _float_dtypes(folder) == {"scales": {torch.float16}, "unquantized": {getattr(torch, dtype)}}
    before, after = load_file(str(quantized["output"] / "model.safetensors")), load_file(str(folder / "model.safetensors"))
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        if not tensor.is_floating_point() or name.endswith(".scales"):  # the packed weights are untouched
            assert torch.equal(tensor, after[name]), name
        else:
            assert torch.equal(tensor.to(getattr(torch, dtype)), after[name]), name


def unpack_gptq(qweight, qzeros, scales):
    """Dequantize auto_round:auto_gptq 4-bit tensors to a [out, in] weight (GPTQ v1 zero points)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    codes = (qweight.unsqueeze(1) >> shifts.view(1, -1, 1)) & 0xF  # [in/8, 8, out]
    codes = codes.reshape(-1, qweight.shape[1])  # [in, out]
    zeros = (qzeros.unsqueeze(2) >> shifts.view(1, 1, -1)) & 0xF  # [in/128, out/8, 8]
    zeros = zeros.reshape(qzeros.shape[0], -1) + 1  # stored zero - 1 (v1 convention)
    group = codes.shape[0] // scales.shape[0]
    zeros = zeros.repeat_interleave(group, dim=0)
    weight = (codes - zeros).float() * scales.float().repeat_interleave(group, dim=0)
    return weight.t().contiguous(), zeros


def test_every_expert_dequantizes_to_its_source_weights(quantized):
    source = load_file(str(quantized["source"] / "model.safetensors"))
    with safe_open(str(quantized["output"] / "model.safetensors"), framework="pt") as handle:
        names = set(handle.keys())
        checked = 0
        for layer in range(LAYERS):
            prefixes = [f"model.layers.{layer}.mlp.experts.{e}.{p}" for e in range(EXPERTS) for p in ("gate_proj", "up_proj", "down_proj")]
            prefixes += [f"model.layers.{layer}.self_attn.{p}" for p in QUANTIZED_2D]
            for prefix in prefixes:
                assert f"{prefix}.weight" not in names
                qweight, qzeros, scales = (handle.get_tensor(f"{prefix}.{s}") for s in ("qweight", "qzeros", "scales"))
                original = source[f"{prefix}.weight"]
                out_f, in_f = original.shape
                assert qweight.dtype == torch.int32 and tuple(qweight.shape) == (in_f // 8, out_f)
                assert tuple(qzeros.shape) == (in_f // GROUP, out_f // 8)
                assert tuple(scales.shape) == (in_f // GROUP, out_f)
                weight, zeros = unpack_gptq(qweight, qzeros, scales)
                assert torch.all(zeros == 8)  # symmetric: stored 7 = 8 - 1
                assert torch.equal(weight, original), prefix
                checked += 1
    assert checked == LAYERS * (EXPERTS * 3 + len(QUANTIZED_2D))


RELOAD_SCRIPT = r"""
import json, sys, torch
from safetensors.torch import load_file, save_file
source, output, ids_path, result_path = sys.argv[1:5]
# auto-round's own sym int4 rounding reproduces the grid weights exactly
from auto_round.data_type.int import quant_tensor_sym, quant_tensor_rtn_sym
worst = 0.0
for name, tensor in load_file(source + "/model.safetensors").items():
    if ".experts." in name or "_proj" in name:
        for fn in (quant_tensor_sym, quant_tensor_rtn_sym):
            qdq = fn(tensor, bits=4, group_size=128)[0]
            worst = max(worst, (qdq - tensor).abs().max().item())
from reap_fast.quantize import load_quantized
model, tokenizer = load_quantized(output)
ids = torch.tensor(json.load(open(ids_path)))
with torch.no_grad():
    logits = model(ids).logits.float()
    generated = model.generate(ids[:, :16], max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
torch.save({"logits": logits, "generated": generated, "rounding_error": worst, "dtype": str(model.dtype),
            "text": tokenizer.decode(generated[0, 16:])}, result_path)
"""


def test_reload_logits_and_generation_match(quantized, tmp_path):
    model = quantized["model"]
    tokenizer = byte_tokenizer()
    ids = torch.tensor([tokenizer("the lazy fox routes tokens to experts and gates")["input_ids"]])
    (tmp_path / "ids.json").write_text(json.dumps(ids.tolist()))
    result_path = tmp_path / "result.pt"
    run = subprocess.run(
        [sys.executable, "-c", RELOAD_SCRIPT, str(quantized["source"]), str(quantized["output"]),
         str(tmp_path / "ids.json"), str(result_path)],
        env=child_env(), capture_output=True, text=True, timeout=180,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = torch.load(result_path)
    assert result["rounding_error"] == 0.0
    # auto-round picks its CPU backend by the processor's features: float16 on most CPUs, bfloat16 on ones
    # with AMX / AVX512-BF16. The references are built in whatever dtype the reloaded model computes in.
    compute = getattr(torch, result["dtype"].removeprefix("torch."))
    assert compute in (torch.float16, torch.bfloat16), result["dtype"]
    ulps = torch.finfo(compute).eps / torch.finfo(torch.float16).eps  # 1 for float16, 8 for bfloat16
    generated = result["generated"]
    with torch.no_grad():
        reference32 = model(ids).logits
        reference_low = model.to(compute)(ids).logits.float()
        model.float()
        along_generated = model(generated).logits  # the unquantized model on the quantized model's own prefixes
    logits = result["logits"].float()
    # Weights are identical (lossless grid), so the only difference is 16-bit arithmetic: it must be no
    # larger than running the unquantized model itself in that dtype (x2 + small slack for the dequantized
    # kernels' other accumulation order).
    low_noise = (reference_low - reference32).abs().max().item()
    tolerance = 2 * low_noise + 1e-3 * ulps
    diff = (logits - reference32).abs().max().item()
    assert diff <= tolerance, (diff, low_noise)
    assert (logits - reference_low).abs().max().item() <= tolerance
    assert diff < 2e-2 * ulps * reference32.abs().max().item()
    # Every position whose top-1 is clear of the noise picks the same token.
    top2 = reference32.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 2 * tolerance
    assert clear.any()
    assert torch.equal(logits.argmax(-1)[clear], reference32.argmax(-1)[clear])
    # Greedy generation: each generated token is the unquantized model's top choice on the same prefix,
    # up to the arithmetic noise (so a near-tie may go either way, as it would between two processors).
    assert torch.equal(generated[:, :16], ids[:, :16]) and generated.shape[1] == 24
    for position in range(16, 24):
        scores = along_generated[0, position - 1]
        chosen = int(generated[0, position])
        assert scores.max().item() - scores[chosen].item() <= 2 * tolerance, position


# ---------------------------------------------------------------- pre-checks (fast, no AutoRound)


@pytest.fixture(scope="module")
def small_source(tmp_path_factory):
    root = tmp_path_factory.mktemp("pre")
    return save_checkpoint(build_model(grid_config(), seed=1), byte_tokenizer(), root / "model")


def _no_auto_round(monkeypatch):
    def refuse(*args, **kwargs):  # pre-checks must fail before AutoRound is ever constructed
        raise AssertionError("AutoRound constructed")

    monkeypatch.setattr(autoround, "_run_auto_round", refuse)


def test_error_group_size_names_sizes(tmp_path, monkeypatch):
    _no_auto_round(monkeypatch)
    source = save_checkpoint(
        build_model(grid_config(hidden_size=128, moe_intermediate_size=96), seed=2), byte_tokenizer(), tmp_path / "m"
    )
    with pytest.raises(q.QuantizationError, match=r"group_size 128 .*moe_intermediate_size=96"):
        q.quantize_w4a16(source, tmp_path / "out", calibration_texts(), QuantConfig(seqlen=SEQLEN))
    with pytest.raises(q.QuantizationError, match=r"hidden_size=192"):
        q.check_group_size(grid_config(hidden_size=192), 128)
    q.check_group_size(grid_config(hidden_size=192, moe_intermediate_size=96, head_dim=48), 32)  # divisible: ok
    assert not (tmp_path / "out").exists()


def test_error_texts_too_short(small_source, tmp_path, monkeypatch):
    _no_auto_round(monkeypatch)
    texts = ["short text"] * 3 + ["x" * 100]
    with pytest.raises(q.QuantizationError) as info:
        q.quantize_w4a16(small_source, tmp_path / "out", texts, QuantConfig(seqlen=512))
    message = str(info.value)
    assert "only 0 of 4 calibration texts are at least seqlen=512 tokens long" in message
    assert "--seqlen 100" in message and "\n" not in message
    with pytest.raises(q.QuantizationError, match=r"only 1 of 4 .*need 2.*--seqlen 10\b"):
        q.quantize_w4a16(small_source, tmp_path / "out", texts, QuantConfig(seqlen=64, min_samples=2))
    with pytest.raises(q.QuantizationError, match="no calibration texts"):
        q.quantize_w4a16(small_source, tmp_path / "out", [], QuantConfig(seqlen=64))
    assert not (tmp_path / "out").exists()


def test_error_not_enough_memory_for_the_whole_model(small_source, tmp_path, monkeypatch):
    """AutoRound holds the whole model on the host: refused in one line before it is constructed."""
    from reap_fast.memory import MemoryBudget

    _no_auto_round(monkeypatch)
    monkeypatch.setattr(autoround, "free_memory", lambda device: MemoryBudget(host_free=1 << 20))
    with pytest.raises(MemoryPlanError, match=r"AutoRound \(the whole model on the host\) needs about") as info:
        q.quantize_w4a16(small_source, tmp_path / "out", calibration_texts(), QuantConfig(seqlen=SEQLEN))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_error_missing_model_folder(tmp_path, monkeypatch):
    _no_auto_round(monkeypatch)
    with pytest.raises(q.QuantizationError, match="model folder not found"):
        q.quantize_w4a16(tmp_path / "nope", tmp_path / "out", calibration_texts())
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFolderError, match="no config.json"):
        q.quantize_w4a16(tmp_path / "empty", tmp_path / "out", calibration_texts())


def test_error_existing_output(small_source, tmp_path, monkeypatch):
    _no_auto_round(monkeypatch)
    existing = save_checkpoint(build_model(grid_config(), seed=3), byte_tokenizer(), tmp_path / "done")
    # a model reap-fast did not write is never replaced, not even with overwrite
    with pytest.raises(OutputError, match="not written by reap-fast"):
        q.quantize_w4a16(small_source, existing, calibration_texts(), QuantConfig(seqlen=SEQLEN, overwrite=True))
    write_marker(existing, "w4a16")
    with pytest.raises(OutputError, match="output folder .* already holds a model; pass --overwrite"):
        q.quantize_w4a16(small_source, existing, calibration_texts(), QuantConfig(seqlen=SEQLEN))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("x")
    with pytest.raises(OutputError, match="not empty"):
        q.quantize_w4a16(small_source, tmp_path / "junk", calibration_texts(), QuantConfig(seqlen=SEQLEN))
    with pytest.raises(OutputError, match="is the model folder"):
        q.quantize_w4a16(small_source, small_source, calibration_texts(), QuantConfig(seqlen=SEQLEN, overwrite=True))
    assert (existing / "config.json").exists()


def test_error_auto_round_missing(small_source, tmp_path, monkeypatch):
    _no_auto_round(monkeypatch)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "auto_round" else real(name, *a))
    with pytest.raises(q.QuantizationError, match=r"auto-round is not installed.*pip install 'reap-fast\[quant\]'"):
        q.quantize_w4a16(small_source, tmp_path / "out", calibration_texts())


def test_subprocess_reports_precheck_error(small_source, tmp_path):
    # The child's QuantizationError comes back with its message (and exit code 2 from main).
    with pytest.raises(q.QuantizationError, match="only 0 of 2 calibration texts"):
        q.run_quantize_subprocess(small_source, tmp_path / "out", ["a", "b"],
                                  QuantConfig(seqlen=SEQLEN), capture_output=True)
    texts_file = tmp_path / "texts.json"
    texts_file.write_text(json.dumps({"texts": ["a"]}))
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"model_dir": str(small_source), "output_dir": str(tmp_path / "out"),
                                   "texts_file": str(texts_file), "config": {"seqlen": 8}}))
    code = worker.main([str(request)])
    assert code == q.EXIT_QUANT_ERROR
    assert not (tmp_path / "out").exists()


def test_incomplete_output_is_detected(tmp_path):
    folder = tmp_path / "partial"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"123")
    assert not q.is_complete_output(folder)
    digest = sha256_file(folder / "model.safetensors")
    (folder / q.MARKER_FILE).write_text(json.dumps({"complete": True, "weight_files": {"model.safetensors": digest}}))
    assert q.is_complete_output(folder)
    (folder / "model.safetensors").write_bytes(b"1234")
    assert not q.is_complete_output(folder)


def _fake_auto_round(fail: BaseException | None = None):
    def fake(model_path, staging, tokenizer, texts, **settings):
        if fail is not None:
            (staging / "model.safetensors").write_bytes(b"partial")
            raise fail
        save_file({"w": torch.zeros(2)}, str(staging / "model.safetensors"))
        config = json.loads((model_path / "config.json").read_text())
        config["quantization_config"] = {"bits": 4, "group_size": 128, "sym": True, "packing_format": q.PACKING_FORMAT}
        (staging / "config.json").write_text(json.dumps(config))
        return []

    return fake


def test_interrupted_run_leaves_nothing_and_keeps_old_output(small_source, tmp_path, monkeypatch):
    old = save_checkpoint(build_model(grid_config(), seed=4), byte_tokenizer(), tmp_path / "out")
    write_marker(old, "w4a16")  # an earlier reap-fast output, which overwrite may replace
    before = sorted(p.name for p in old.iterdir())
    workspace_before = os.environ.get("AR_WORK_SPACE")
    monkeypatch.setattr(autoround, "_run_auto_round", _fake_auto_round(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        q.quantize_w4a16(small_source, old, calibration_texts(),
                         QuantConfig(seqlen=SEQLEN, overwrite=True, device="cpu"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no partial / scratch folders
    assert sorted(p.name for p in old.iterdir()) == before
    assert not q.is_complete_output(old)
    # a run that completes replaces the old folder in one rename, marker included
    monkeypatch.setattr(autoround, "_run_auto_round", _fake_auto_round())
    q.quantize_w4a16(small_source, old, calibration_texts(), QuantConfig(seqlen=SEQLEN, overwrite=True, device="cpu"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert q.is_complete_output(old)
    assert os.environ.get("AR_WORK_SPACE") == workspace_before  # restored after the run
