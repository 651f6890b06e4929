"""--engine auto takes the Triton engine on CUDA only where it can observe every MoE layer (else the reference
engine, logged with the reason); an explicit --engine triton on such a model is a one-line error before any
calibration work. CUDA is pretended (device resolution patched): the decision reads the model, not the GPU."""

import logging

import pytest
import torch
from reap_fast.cli import main
from reap_fast.config import ObserveConfig
from reap_fast.errors import EngineUnavailableError
from reap_lab.tiny import build_model, make_tiny_checkpoint, tiny_qwen3_moe_config
from reap_fast.models import find_moe_layers
from reap_fast.observe import observe_checkpoint, settings
from reap_fast.observe.engine_choice import choose_engine
from reap_fast.observe.settings import process_settings


@pytest.fixture
def pretend_cuda(monkeypatch):
    monkeypatch.setattr(settings, "resolve_device", lambda device: "cuda")


def _model(case: str) -> torch.nn.Module:
    """A tiny Qwen3-MoE in bf16 on the CPU whose second MoE layer the Triton engine cannot take (but 'supported')."""
    model = build_model(tiny_qwen3_moe_config(), dtype=torch.bfloat16)
    experts = find_moe_layers(model)[1].experts
    if case == "mixed-dtypes":
        experts.down_proj.data = experts.down_proj.data.float()
    elif case == "gelu":
        experts.act_fn = torch.nn.GELU()
    elif case == "post-expert-norm":
        experts.has_post_expert_norm = True
    return model


@pytest.mark.parametrize("case, reason", [
    ("mixed-dtypes", "layer 1: Qwen3MoeExperts: mixed parameter dtypes torch.bfloat16, torch.float32"),
    ("gelu", "layer 1: Qwen3MoeExperts: activation GELU is not supported"),
    ("post-expert-norm", "layer 1: Qwen3MoeExperts: a post-expert norm is not supported"),
])
def test_auto_falls_back_to_the_reference_engine_with_the_reason(case, reason, caplog):
    model = _model(case)
    with caplog.at_level(logging.INFO, logger="reap_fast.observe.engine_choice"):
        assert choose_engine("auto", "cuda", model) == "reference"
    (record,) = caplog.records
    assert record.getMessage().startswith(f"--engine auto: observing with the reference engine ({reason}")
    with pytest.raises(EngineUnavailableError, match=f"^--engine triton cannot observe this model: {reason}"):
        choose_engine("triton", "cuda", model)


def test_auto_takes_triton_for_a_supported_model_and_reference_off_cuda():
    model = _model("supported")
    assert choose_engine("auto", "cuda", model) == "triton"
    assert choose_engine("triton", "cuda", model) == "triton"
    assert choose_engine("auto", "cpu", model) == "reference"
    assert choose_engine("reference", "cuda", _model("gelu")) == "reference"


def test_process_settings_decide_from_the_config(pretend_cuda):
    """The resolved engine (what the checkpoint fingerprint and the streamed path read) follows the model."""
    supported, gelu = tiny_qwen3_moe_config(), tiny_qwen3_moe_config(hidden_act="gelu")
    resolved = process_settings(ObserveConfig(dtype="bfloat16"), supported)
    assert (resolved.device, resolved.engine) == ("cuda", "triton")
    assert process_settings(resolved, supported) == resolved
    fallback = process_settings(ObserveConfig(dtype="bfloat16"), gelu)
    assert fallback.engine == "reference"
    assert process_settings(fallback, gelu) == fallback
    with pytest.raises(EngineUnavailableError, match="layer 0: Qwen3MoeExperts: activation GELUActivation"):
        process_settings(ObserveConfig(dtype="bfloat16", engine="triton"), gelu)


def test_explicit_triton_is_refused_in_one_line_before_calibration(tmp_path, capsys):
    """The dataset does not exist: the refusal comes before anything reads it."""
    model = make_tiny_checkpoint(tmp_path / "model", hidden_act="gelu")
    missing = str(tmp_path / "no-data.jsonl")
    capsys.readouterr()  # the checkpoint writer's progress bar
    with pytest.raises(EngineUnavailableError, match="activation GELUActivation is not supported"):
        observe_checkpoint(str(model), missing, config=ObserveConfig(engine="triton", device="cpu"))
    code = main(["observe", "--model", str(model), "--dataset", missing, "--output", str(tmp_path / "o.pt"),
                 "--engine", "triton", "--device", "cpu"])
    assert code != 0
    assert capsys.readouterr().err.splitlines() == [
        "reap-fast observe: error: --engine triton cannot observe this model: layer 0: Qwen3MoeExperts: "
        "activation GELUActivation is not supported by the triton engine (silu only)"
    ]


def test_engine_registry_is_the_config_choices_registered_through_transformers_public_api():
    """ENGINES (name -> function) holds every --engine choice but auto; register_engine puts a wrapper into
    transformers' public experts mapping (idempotent), a model switched to it gives the stock output, and an
    unknown name is a one-line error naming the choices."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    from reap_fast.config.observe import ENGINE_CHOICES
    from reap_fast.observe.engines import ENGINES, get_engine, register_engine
    from reap_fast.observe.reference import reference_experts_forward

    assert set(ENGINES) == set(ENGINE_CHOICES) - {"auto"}
    assert get_engine("reference") is reference_experts_forward
    with pytest.raises(EngineUnavailableError, match="^unknown engine 'fast'; choose one of: reference, triton$"):
        get_engine("fast")
    key = register_engine("reference")
    assert key == "reap_fast_reference" and key in ALL_EXPERTS_FUNCTIONS
    wrapper = ALL_EXPERTS_FUNCTIONS[key]
    assert register_engine("reference") == key and ALL_EXPERTS_FUNCTIONS[key] is wrapper
    model = build_model(tiny_qwen3_moe_config(), dtype=torch.float32)
    ids = torch.arange(12).reshape(2, 6) % 200
    with torch.no_grad():
        stock = model(input_ids=ids).logits
        model.set_experts_implementation(key)
        ours = model(input_ids=ids).logits
    torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-5)
