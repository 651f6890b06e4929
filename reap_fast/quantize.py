"""W4A16 quantization of a (pruned) MoE checkpoint with AutoRound.

The heavy lifting is done by the ``auto-round`` library (``pip install 'reap-fast[quant]'``); this
module adds what a pruning pipeline needs around it:

* pre-checks that fail fast with a one-line :class:`QuantizationError` *before* AutoRound is
  constructed (library missing, model folder missing, output folder already holding a model, layer
  in-features not divisible by the group size, calibration texts too short for ``seqlen``);
* routers (``mlp.gate``) and shared-expert gates (``shared_expert_gate``) kept in 16 bit, checked
  again in the saved checkpoint;
* an atomic output: everything is written into a hidden sibling folder that is renamed into place
  only once complete, together with ``reap_fast_quant.json`` (settings, versions, sha256 of each
  weight file) so a pipeline can tell a complete output from an interrupted one;
* process isolation: constructing ``AutoRound`` patches transformers' MoE block classes for the whole
  process, so :func:`run_quantize_subprocess` runs ``python -m reap_fast.quantize`` in a child.

Nothing here imports ``auto_round`` at module import time.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .children import exit_on_sigterm, run_child
from .devices import resolve_device
from .errors import ReapFastError
from .fileio import publish_folder, sha256_file
from .logs import configure_logging
from .outputs import OutputLock, check_output, clean_leftovers, work_prefix, write_marker
from .preflight import check_model_folder, check_output_location, weights_bytes

logger = logging.getLogger(__name__)

MARKER_FILE = "reap_fast_quant.json"
MARKER_FORMAT = 1
INSTALL_HINT = "pip install 'reap-fast[quant]'"
PACKING_FORMAT = "auto_round:auto_gptq"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
# Exit code of ``main`` for a QuantizationError (argparse also uses 2 for bad flags).
EXIT_QUANT_ERROR = 2

# Config attributes whose values are in-features of some quantized linear layer; used to name
# offending sizes in the group-size error.
_SIZE_ATTRIBUTES = (
    "hidden_size",
    "moe_intermediate_size",
    "intermediate_size",
    "shared_expert_intermediate_size",
    "head_dim",
    "kv_lora_rank",
    "q_lora_rank",
)


class QuantizationError(ReapFastError, ValueError):
    """A problem with the inputs or settings of a quantization run (one-line message)."""


# --------------------------------------------------------------------------------------------------
# Pre-checks (cheap: no AutoRound, no weights loaded)
# --------------------------------------------------------------------------------------------------


def auto_round_version() -> str:
    """The installed auto-round version; :class:`QuantizationError` when it is not installed."""
    if importlib.util.find_spec("auto_round") is None:
        raise QuantizationError(f"auto-round is not installed; install it with: {INSTALL_HINT}")
    try:
        return importlib.metadata.version("auto-round")
    except importlib.metadata.PackageNotFoundError:  # installed from source under another name
        import auto_round  # noqa: PLC0415 - importing does not patch anything, constructing does

        return str(getattr(auto_round, "__version__", "unknown"))


def check_model_dir(model_dir: str | os.PathLike) -> Path:
    """The model folder as a Path; error when it is missing, incomplete or corrupt, or has no tokenizer."""
    try:
        check_model_folder(str(Path(model_dir).expanduser()), need_tokenizer=True)
    except ReapFastError as error:
        raise QuantizationError(str(error)) from None
    return Path(model_dir).expanduser()


def check_output_dir(output_dir: str | os.PathLike, *, overwrite: bool = False, model_dir: Path | None = None) -> Path:
    """The output folder as a Path, checked against the output contract (:func:`reap_fast.outputs.check_output`)."""
    try:
        return check_output(output_dir, {"model folder": model_dir}, overwrite)
    except ReapFastError as error:
        raise QuantizationError(str(error)) from None


def _router_like(name: str) -> bool:
    return name.endswith(".mlp.gate") or name.endswith("shared_expert_gate") or name.endswith(".router")


def _quantizable_in_features(config: Any) -> dict[int, list[str]]:
    """in-feature size -> example layer names, for the linears AutoRound would quantize.

    Built on the meta device (no memory, no weights). Fused MoE expert tensors (3-D parameters,
    ``[experts, out, in]`` or ``[experts, in, out]``) contribute both of their matrix dimensions,
    which covers their in-features whichever layout the family uses.
    """
    import torch  # noqa: PLC0415
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    text_config = getattr(config, "text_config", None) or config
    known = {getattr(text_config, a, None) for a in _SIZE_ATTRIBUTES if a != "head_dim"}
    sizes: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        if ".layers." not in f".{name}." or _router_like(name):
            continue
        if isinstance(module, torch.nn.Linear):
            sizes.setdefault(module.in_features, []).append(name)
        for pname, param in module.named_parameters(recurse=False):
            if param.dim() == 3:
                # [experts, out, in] or [experts, in, out]: keep the dims that are config sizes
                # (so a fused gate_up's 2 * intermediate is not mistaken for an in-feature).
                dims = [int(d) for d in param.shape[-2:]]
                for dim in [d for d in dims if d in known] or dims:
                    sizes.setdefault(dim, []).append(f"{name}.{pname}")
    return sizes


def check_group_size(config: Any, group_size: int) -> None:
    """Error when a quantized layer's in-features are not divisible by ``group_size``."""
    if group_size == -1:
        return
    if group_size <= 0:
        raise QuantizationError(f"group_size must be positive or -1, got {group_size}")
    try:
        sizes = _quantizable_in_features(config)
    except Exception as error:  # an architecture transformers cannot build on meta: use the config
        logger.debug("meta model failed (%s); checking config sizes only", error)
        sizes = {}
    text_config = getattr(config, "text_config", None) or config
    for attr in _SIZE_ATTRIBUTES:
        value = getattr(text_config, attr, None)
        if attr == "intermediate_size" and sizes:
            continue  # only matters when a dense MLP exists, which the meta model already shows
        if attr == "head_dim":
            continue  # head_dim alone is not an in-feature (num_heads * head_dim is)
        if isinstance(value, int) and value > 0:
            sizes.setdefault(value, []).append(attr)
    bad = sorted(size for size in sizes if size % group_size)
    if not bad:
        return
    described = []
    for size in bad:
        attrs = [a for a in _SIZE_ATTRIBUTES if getattr(text_config, a, None) == size and a != "head_dim"]
        heads, head_dim = getattr(text_config, "num_attention_heads", None), getattr(text_config, "head_dim", None)
        if not attrs and isinstance(heads, int) and isinstance(head_dim, int) and heads * head_dim == size:
            attrs = ["num_attention_heads*head_dim"]
        label = "/".join(attrs) if attrs else "in_features"
        example = next((n for n in sizes[size] if "." in n), sizes[size][0])
        described.append(f"{label}={size} (e.g. {example})")
    raise QuantizationError(
        f"group_size {group_size} does not divide the in-features of quantized layers: {', '.join(described)}; "
        "this model cannot be quantized with that group size"
    )


def token_lengths(tokenizer: Any, texts: Sequence[str]) -> list[int]:
    """Token count of each text, as AutoRound tokenizes it (special tokens included)."""
    if not texts:
        return []
    encoded = tokenizer(list(texts))["input_ids"]
    return [len(ids) for ids in encoded]


def check_texts(
    tokenizer: Any, texts: Sequence[str], seqlen: int, *, nsamples: int, min_samples: int = 1
) -> int:
    """How many texts are at least ``seqlen`` tokens long; error when fewer than ``min_samples``.

    AutoRound silently drops calibration samples shorter than ``seqlen`` and exits the process when
    none remain, so this is checked up front with the model's own tokenizer.
    """
    if isinstance(texts, (str, bytes)) or not all(isinstance(t, str) for t in texts):
        raise QuantizationError("calibration texts must be a list of strings")
    if not texts:
        raise QuantizationError("no calibration texts given")
    if seqlen <= 0:
        raise QuantizationError(f"seqlen must be positive, got {seqlen}")
    lengths = token_lengths(tokenizer, texts)
    long_enough = sum(length >= seqlen for length in lengths)
    needed = max(1, min_samples)
    if long_enough < needed:
        ranked = sorted(lengths, reverse=True)
        fits = ranked[needed - 1] if len(ranked) >= needed else 0
        hint = f"use a smaller --seqlen (e.g. --seqlen {fits})" if fits > 0 else "use a smaller --seqlen"
        raise QuantizationError(
            f"only {long_enough} of {len(texts)} calibration texts are at least seqlen={seqlen} tokens long "
            f"(need {needed}; auto-round drops shorter ones, longest is {ranked[0]} tokens); "
            f"{hint} or give longer texts"
        )
    if long_enough < nsamples:
        logger.warning(
            "only %d calibration texts are at least %d tokens long (nsamples=%d); quantization uses %d samples",
            long_enough,
            seqlen,
            nsamples,
            long_enough,
        )
    return long_enough


# --------------------------------------------------------------------------------------------------
# Output checks
# --------------------------------------------------------------------------------------------------


def _weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def _tensor_names(folder: Path) -> set[str]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return set(json.loads(index.read_text())["weight_map"])
    names: set[str] = set()
    from safetensors import safe_open  # noqa: PLC0415

    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            names.update(handle.keys())
    return names


def verify_saved(folder: Path, *, bits: int, group_size: int, sym: bool, routers: Iterable[str]) -> dict:
    """Check the saved quantization_config and that routers stayed 16 bit; returns the config."""
    config_path = folder / "config.json"
    if not config_path.exists():
        raise QuantizationError(f"auto-round wrote no config.json into {folder}")
    qcfg = json.loads(config_path.read_text()).get("quantization_config")
    if not isinstance(qcfg, dict):
        raise QuantizationError("saved config.json has no quantization_config")
    expected = {"bits": bits, "group_size": group_size, "sym": sym, "packing_format": PACKING_FORMAT}
    wrong = {k: qcfg.get(k) for k, v in expected.items() if qcfg.get(k) != v}
    if wrong:
        raise QuantizationError(f"saved quantization_config differs from the request: {wrong} (wanted {expected})")
    names = _tensor_names(folder)
    quantized_routers = [r for r in routers if f"{r}.qweight" in names or f"{r}.weight" not in names]
    if quantized_routers:
        raise QuantizationError(f"routers were quantized or are missing: {quantized_routers[:4]}")
    return qcfg


def read_marker(output_dir: str | os.PathLike) -> dict | None:
    path = Path(output_dir) / MARKER_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def is_complete_output(output_dir: str | os.PathLike, *, check_hashes: bool = True) -> bool:
    """True when ``output_dir`` is a finished quantization output (marker present, hashes match)."""
    folder = Path(output_dir)
    marker = read_marker(folder)
    if not marker or not marker.get("complete"):
        return False
    files = marker.get("weight_files", {})
    if not files:
        return False
    for name, digest in files.items():
        path = folder / name
        if not path.exists():
            return False
        if check_hashes and sha256_file(path) != digest:
            return False
    return True


# --------------------------------------------------------------------------------------------------
# Quantization
# --------------------------------------------------------------------------------------------------


def quantize_w4a16(
    model_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    texts: Sequence[str],
    *,
    bits: int = 4,
    group_size: int = 128,
    sym: bool = True,
    iters: int = 200,
    nsamples: int = 128,
    seqlen: int = 512,
    batch_size: int = 8,
    device: str = "auto",
    seed: int = 42,
    overwrite: bool = False,
    min_samples: int = 1,
) -> Path:
    """Quantize the checkpoint in ``model_dir`` to W4A16 with AutoRound and save it to ``output_dir``.

    Runs in *this* process: AutoRound patches transformers' MoE classes process-wide, so prefer
    :func:`run_quantize_subprocess` unless this process does nothing else with transformers.
    Saved with ``save_quantized(format="auto_round")`` (GPTQ-compatible ``auto_round:auto_gptq``
    packing), routers and shared-expert gates in 16 bit, the tokenizer alongside, and
    ``reap_fast_quant.json``. The folder appears at ``output_dir`` only once complete.
    """
    with OutputLock(output_dir):  # one process per output; leftovers of killed runs go first
        clean_leftovers(output_dir)
        version = auto_round_version()
        model_path = check_model_dir(model_dir)
        out = check_output_dir(output_dir, overwrite=overwrite, model_dir=model_path)
        if bits not in (2, 3, 4, 8):
            raise QuantizationError(f"bits must be 2, 3, 4 or 8, got {bits}")
        for label, value, low in (("iters", iters, 0), ("nsamples", nsamples, 1), ("batch_size", batch_size, 1)):
            if value < low:
                raise QuantizationError(f"{label} must be >= {low}, got {value}")
        device = resolve_device(device)

        from transformers import AutoConfig, AutoTokenizer  # noqa: PLC0415

        config = AutoConfig.from_pretrained(model_path)
        check_group_size(config, group_size)
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_path)
        except Exception as error:
            raise QuantizationError(f"cannot load the tokenizer from {model_path}: {error}") from error
        usable = check_texts(tokenizer, texts, seqlen, nsamples=nsamples, min_samples=min_samples)

        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            check_output_location(out, weights_bytes(model_path) // 2)  # 4-bit weights of a 16-bit model, with room
        except ReapFastError as error:
            raise QuantizationError(str(error)) from None
        staging = Path(tempfile.mkdtemp(prefix=work_prefix(out, "partial"), dir=out.parent))
        workspace = Path(tempfile.mkdtemp(prefix=work_prefix(out, "ar-work"), dir=out.parent))
        previous_workspace = os.environ.get("AR_WORK_SPACE")
        os.environ["AR_WORK_SPACE"] = str(workspace)
        try:
            routers = _run_auto_round(
                model_path,
                staging,
                tokenizer,
                list(texts),
                bits=bits,
                group_size=group_size,
                sym=sym,
                iters=iters,
                nsamples=nsamples,
                seqlen=seqlen,
                batch_size=batch_size,
                device=device,
                seed=seed,
            )
            tokenizer.save_pretrained(staging)
            qcfg = verify_saved(staging, bits=bits, group_size=group_size, sym=sym, routers=routers)
            marker = {
                "format": MARKER_FORMAT,
                "complete": True,
                "tool": "reap-fast quantize",
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "source_model": str(model_path.resolve()),
                "auto_round_version": version,
                "transformers_version": importlib.metadata.version("transformers"),
                "torch_version": importlib.metadata.version("torch"),
                "settings": {
                    "scheme": f"W{bits}A16",
                    "bits": bits,
                    "group_size": group_size,
                    "sym": sym,
                    "iters": iters,
                    "nsamples": nsamples,
                    "seqlen": seqlen,
                    "batch_size": batch_size,
                    "device": device,
                    "seed": seed,
                    "format": "auto_round",
                    "packing_format": qcfg.get("packing_format"),
                    "calibration_texts": len(texts),
                    "calibration_texts_used": min(usable, nsamples),
                },
                "unquantized_routers": sorted(routers),
                "weight_files": {p.name: sha256_file(p) for p in _weight_files(staging)},
            }
            (staging / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
            write_marker(staging, "w4a16")
            publish_folder(staging, out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        finally:
            shutil.rmtree(workspace, ignore_errors=True)
            if previous_workspace is None:
                os.environ.pop("AR_WORK_SPACE", None)
            else:
                os.environ["AR_WORK_SPACE"] = previous_workspace
        logger.info("quantized model written to %s", out)
        return out


def _run_auto_round(
    model_path: Path,
    staging: Path,
    tokenizer: Any,
    texts: list[str],
    *,
    bits: int,
    group_size: int,
    sym: bool,
    iters: int,
    nsamples: int,
    seqlen: int,
    batch_size: int,
    device: str,
    seed: int,
) -> list[str]:
    """Construct AutoRound, quantize, save into ``staging``; returns the router names kept 16 bit."""
    from auto_round import AutoRound  # noqa: PLC0415
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype="auto")
    model.eval()
    routers = [name for name, _ in model.named_modules() if _router_like(name) and ".layers." in name]
    options: dict[str, Any] = {}
    if device == "cpu":
        options["enable_torch_compile"] = False
    rounder = AutoRound(
        model,
        tokenizer=tokenizer,
        scheme=f"W{bits}A16",
        bits=bits,
        group_size=group_size,
        sym=sym,
        iters=iters,
        nsamples=nsamples,
        seqlen=seqlen,
        batch_size=batch_size,
        dataset=texts,  # a local list: never downloads a calibration set
        device_map=device,
        seed=seed,
        ignore_layers=",".join(routers),
        **options,
    )
    rounder.quantize()
    rounder.save_quantized(str(staging), format="auto_round")
    return routers


# --------------------------------------------------------------------------------------------------
# Child process and CLI
# --------------------------------------------------------------------------------------------------

_OPTION_FLAGS = {
    "bits": "--bits",
    "group_size": "--group-size",
    "iters": "--iters",
    "nsamples": "--nsamples",
    "seqlen": "--seqlen",
    "batch_size": "--batch-size",
    "device": "--device",
    "seed": "--seed",
    "min_samples": "--min-samples",
}


def run_quantize_subprocess(
    model_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    texts: Sequence[str] | None = None,
    *,
    texts_file: str | os.PathLike | None = None,
    overwrite: bool = False,
    python: str | None = None,
    timeout: float | None = None,
    capture_output: bool = False,
    env: dict[str, str] | None = None,
    **options: Any,
) -> Path:
    """Run :func:`quantize_w4a16` in a child ``python -m reap_fast.quantize`` process.

    This process's transformers classes are never patched by AutoRound. Give either ``texts`` (a
    list, written to a temporary JSON file) or ``texts_file`` (a JSON list of strings, or an object
    with a ``"texts"`` list). ``options`` are the keyword settings of :func:`quantize_w4a16`
    (``bits``, ``group_size``, ``iters``, ``nsamples``, ``seqlen``, ``batch_size``, ``device``,
    ``seed``, ``min_samples``); ``sym`` must stay True (the CLI quantizes symmetrically).
    A :class:`QuantizationError` in the child is raised again here with the same message; any other
    failure raises ``RuntimeError``.
    """
    if (texts is None) == (texts_file is None):
        raise QuantizationError("give exactly one of texts or texts_file")
    if not options.pop("sym", True):
        raise QuantizationError("run_quantize_subprocess supports sym=True only")
    unknown = sorted(set(options) - set(_OPTION_FLAGS))
    if unknown:
        raise TypeError(f"unknown quantization options: {unknown}")
    output_path = Path(output_dir).expanduser().absolute()
    output_path.parent.mkdir(parents=True, exist_ok=True)
    # Beside the output, named with this pid: a run killed with SIGKILL leaves it to the next run's cleanup.
    with tempfile.TemporaryDirectory(prefix=work_prefix(output_path, "scratch"), dir=output_path.parent) as scratch:
        scratch_path = Path(scratch)
        if texts is not None:
            if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
                raise QuantizationError("calibration texts must be a list of strings")
            texts_file = scratch_path / "texts.json"
            texts_file.write_text(json.dumps(list(texts)))
        error_file = scratch_path / "error.json"
        argv = [
            python or sys.executable,
            "-m",
            "reap_fast.quantize",
            "--model",
            str(model_dir),
            "--output",
            str(output_dir),
            "--texts-file",
            str(texts_file),
            "--error-json",
            str(error_file),
        ]
        for key, value in options.items():
            argv += [_OPTION_FLAGS[key], str(value)]
        if overwrite:
            argv.append("--overwrite")
        child_env = dict(os.environ if env is None else env)
        package_root = str(Path(__file__).resolve().parent.parent)
        child_env["PYTHONPATH"] = os.pathsep.join(
            [package_root] + [p for p in child_env.get("PYTHONPATH", "").split(os.pathsep) if p]
        )
        result = run_child(argv, env=child_env, timeout=timeout, capture_output=capture_output)
        if result.returncode == 0:
            return Path(output_dir)
        details = json.loads(error_file.read_text()) if error_file.exists() else {}
        if details.get("type") == "QuantizationError":
            raise QuantizationError(details["message"])
        tail = (result.stderr or "")[-2000:] if capture_output else ""
        message = details.get("message") or f"exit code {result.returncode}"
        raise RuntimeError(f"quantization child process failed: {message}\n{tail}".rstrip())


def load_texts_file(path: str | os.PathLike) -> list[str]:
    """Calibration texts from a JSON file: a list of strings or ``{"texts": [...]}``."""
    file = Path(path)
    if not file.exists():
        raise QuantizationError(f"texts file not found: {file}")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise QuantizationError(f"texts file is not valid JSON: {file}: {error}") from error
    if isinstance(data, dict):
        data = data.get("texts")
    if not isinstance(data, list) or not all(isinstance(t, str) for t in data):
        raise QuantizationError(f'texts file must hold a JSON list of strings or {{"texts": [...]}}: {file}')
    return data


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reap-fast quantize",
        description="Quantize a (pruned) MoE checkpoint to W4A16 with AutoRound (auto_round format, GPTQ packing).",
    )
    parser.add_argument("--model", required=True, help="Hugging Face model folder to quantize")
    parser.add_argument("--output", required=True, help="output folder (created atomically)")
    parser.add_argument("--texts-file", required=True, help='calibration texts: JSON list of strings or {"texts": [...]}')
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--iters", type=int, default=200, help="AutoRound tuning steps per block (0 = RTN)")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--min-samples", type=int, default=1, help="fail when fewer texts are >= seqlen tokens")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--error-json", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    """``reap-fast quantize`` / ``python -m reap_fast.quantize``; returns the exit code."""
    args = build_parser().parse_args(argv)
    exit_on_sigterm()  # a terminated child still removes its staging folders
    configure_logging("%(levelname)s %(name)s: %(message)s")

    def report(kind: str, message: str) -> None:
        if args.error_json:
            Path(args.error_json).write_text(json.dumps({"type": kind, "message": message}))

    try:
        texts = load_texts_file(args.texts_file)
        out = quantize_w4a16(
            args.model,
            args.output,
            texts,
            bits=args.bits,
            group_size=args.group_size,
            iters=args.iters,
            nsamples=args.nsamples,
            seqlen=args.seqlen,
            batch_size=args.batch_size,
            device=args.device,
            seed=args.seed,
            overwrite=args.overwrite,
            min_samples=args.min_samples,
        )
    except ReapFastError as error:
        report("QuantizationError", str(error))
        print(f"reap-fast quantize: error: {error}", file=sys.stderr)
        return EXIT_QUANT_ERROR
    except Exception as error:
        report(type(error).__name__, f"{type(error).__name__}: {error}")
        raise
    print(out)
    return 0


# --------------------------------------------------------------------------------------------------
# Reload
# --------------------------------------------------------------------------------------------------


def load_quantized(output_dir: str | os.PathLike, *, device: str = "cpu", dtype: Any = None):
    """Reload a quantized output with transformers; returns ``(model, tokenizer)``.

    Needs auto-round installed. On CPU transformers uses auto-round's torch backend
    (``auto_round:torch_zp``), which computes in float16, or in bfloat16 on processors with AMX /
    AVX512-BF16 (read ``model.dtype``). Loading converts the model through auto-round, which also
    patches transformers' MoE classes process-wide: call this in a separate
    process, or last, after everything that needs the original classes.
    """
    auto_round_version()
    folder = Path(output_dir)
    if not (folder / "config.json").exists():
        raise QuantizationError(f"not a quantized model folder (no config.json): {folder}")
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    kwargs: dict[str, Any] = {"device_map": resolve_device(device)}
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model.eval(), tokenizer


if __name__ == "__main__":
    sys.exit(main())
