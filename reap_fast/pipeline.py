"""``reap-fast run``: observe -> prune -> quantize -> evaluate, resumable stage by stage.

Output folder layout::

    OUTPUT/observation.pt     REAP statistics (upstream format)
    OUTPUT/pruned/            pruned model + tokenizer + pruned_experts.json + reap_args.yaml
    OUTPUT/w4a16/             AutoRound W4A16 model (with --quantize w4a16)
    OUTPUT/eval.json          perplexities (with --eval)
    OUTPUT/pruned.png         picture of what was pruned (reap_fast.picture)
    OUTPUT/lm_eval.json       lm-evaluation-harness tasks of the three models (with --eval-tasks);
    OUTPUT/lm_eval/           one file per evaluated model, reused when a run resumes mid-stage
    OUTPUT/pipeline.json      settings, and per finished stage: seconds and SHA-256 of its outputs

A rerun skips every stage whose recorded outputs still exist with the recorded checksums, so an
interrupted run continues where it stopped; a folder's mere presence is never taken as done.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm

from .config import ConfigError, ObserveConfig, PruneConfig, QuantConfig
from .config.evaluate import EvalConfig, HarnessSettings
from .config.prune import DEFAULT_COMPRESSION_RATIO
from .errors import ReapFastError
from .evaluate.comparison import Comparison, ModelEntry, format_table, run_comparison
from .fileio import atomic_write_json, human_size, sha256_file, size_on_disk, tree_checksums
from .outputs import (
    OutputError,
    check_not_overlapping,
    check_output,
    clean_folder_leftovers,
    clean_leftovers,
    output_lock,
    write_marker,
)
from .picture import picture_path, write_pruning_picture
from .preflight import check_model_folder, check_output_location, weights_bytes

logger = logging.getLogger(__name__)

STAGES = ("observe", "prune", "quantize", "eval", "lm_eval")


class PipelineError(ReapFastError, ValueError):
    """A pipeline setting or state that prevents the run (one-line message)."""


@dataclass
class PipelineConfig:
    """Settings of one ``reap-fast run`` (the part that defines its results is fingerprinted)."""

    model: str
    dataset: str
    output: str
    compression_ratio: float | None = DEFAULT_COMPRESSION_RATIO  # PruneConfig's when no budget is given
    n_experts_to_prune: int | None = PruneConfig.n_experts_to_prune
    method: str = PruneConfig.method
    samples_per_category: int | None = ObserveConfig.samples_per_category
    model_max_length: int = ObserveConfig.model_max_length
    batch_size: int = ObserveConfig.batch_size
    seed: int = 42
    renormalize: bool = ObserveConfig.renormalize
    global_ranking: bool = PruneConfig.global_ranking
    min_experts_per_layer: int | None = PruneConfig.min_experts_per_layer
    preserve_super_experts: bool = PruneConfig.preserve_super_experts
    engine: str = ObserveConfig.engine
    device: str = ObserveConfig.device
    dtype: str = ObserveConfig.dtype
    layerwise: bool = ObserveConfig.layerwise
    checkpoint_every: float = ObserveConfig.checkpoint_every  # observation checkpoints: a rerun resumes from them
    quantize: str | None = None  # None or "w4a16"
    quant_iters: int = QuantConfig.iters
    quant_nsamples: int = QuantConfig.nsamples
    quant_seqlen: int = QuantConfig.seqlen
    quant_batch_size: int = QuantConfig.batch_size
    eval_dataset: str | None = None
    eval_samples: int = EvalConfig.samples
    eval_max_length: int = EvalConfig.max_length
    lm_eval: HarnessSettings | None = None  # lm-evaluation-harness tasks (--eval-tasks)
    overwrite: bool = False
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def fingerprint(self) -> dict[str, Any]:
        """The settings that determine the outputs (resuming with different ones is refused)."""
        settings = asdict(self)
        # lm_eval is checked by its own stage (lm_eval.json holds its settings): adding or changing
        # --eval-tasks on a finished run only runs that stage.
        for volatile in ("output", "overwrite", "progress", "engine", "device", "layerwise", "checkpoint_every", "extra",
                         "lm_eval"):
            settings.pop(volatile)
        return settings

    def evaluation(self) -> EvalConfig:
        """The evaluation stage's settings (validated)."""
        return EvalConfig(self.eval_dataset, self.eval_samples, self.eval_max_length, harness=self.lm_eval)

    def stages(self) -> list[str]:
        chosen = ["observe", "prune"]
        if self.quantize:
            chosen.append("quantize")
        if self.eval_dataset:
            chosen.append("eval")
        if self.lm_eval:
            chosen.append("lm_eval")
        return chosen


def validate(config: PipelineConfig) -> None:
    """Cheap checks before any model is loaded."""
    if config.quantize not in (None, "w4a16"):
        raise PipelineError(f"--quantize supports only w4a16, got {config.quantize!r}")
    try:
        prune_config(config)
        observe_config(config)
        if config.quantize:
            quant_config(config)
        config.evaluation()
    except ConfigError as exc:
        raise PipelineError(str(exc)) from None


def prune_config(config: PipelineConfig) -> PruneConfig:
    """The prune stage's settings of a run (the pruned folder is rewritten when the stage reruns)."""
    return PruneConfig(
        method=config.method, compression_ratio=config.compression_ratio,
        n_experts_to_prune=config.n_experts_to_prune, seed=config.seed, global_ranking=config.global_ranking,
        min_experts_per_layer=config.min_experts_per_layer, preserve_super_experts=config.preserve_super_experts,
        device=config.device, dtype=config.dtype, overwrite=True,
    )  # fmt: skip


def observe_config(config: PipelineConfig) -> ObserveConfig:
    """The observation stage's settings of a run (its checkpoints in OUTPUT/observation.partial, resumed)."""
    return ObserveConfig(
        samples_per_category=config.samples_per_category, model_max_length=config.model_max_length,
        batch_size=config.batch_size, seed=config.seed, engine=config.engine, renormalize=config.renormalize,
        device=config.device, dtype=config.dtype, layerwise=config.layerwise, progress=config.progress,
        checkpoint_dir=str(Path(config.output) / "observation.partial"), checkpoint_every=config.checkpoint_every,
        resume=True,
    )  # fmt: skip


def quant_config(config: PipelineConfig) -> QuantConfig:
    """The quantize stage's settings of a run (it replaces an earlier, interrupted OUTPUT/w4a16)."""
    return QuantConfig(
        iters=config.quant_iters, nsamples=config.quant_nsamples, seqlen=config.quant_seqlen,
        batch_size=config.quant_batch_size, device=config.device, seed=config.seed, overwrite=True,
    )


class Pipeline:
    """Runs the stages of a :class:`PipelineConfig` with resume by checksummed outputs."""

    def __init__(self, config: PipelineConfig) -> None:
        validate(config)
        self.config = config
        self.root = Path(config.output)
        self.state_path = self.root / "pipeline.json"
        self.state = self._load_state()

    @property
    def observation(self) -> Path:
        return self.root / "observation.pt"

    @property
    def pruned(self) -> Path:
        return self.root / "pruned"

    @property
    def quantized(self) -> Path:
        return self.root / "w4a16"

    @property
    def eval_file(self) -> Path:
        return self.root / "eval.json"

    @property
    def lm_eval_file(self) -> Path:
        return self.root / "lm_eval.json"

    def _load_state(self) -> dict[str, Any]:
        fresh = {"settings": self.config.fingerprint(), "stages": {}}
        try:
            check_not_overlapping(self.root, self.inputs())
            if not self.state_path.is_file():
                check_output(self.root, self.inputs(), self.config.overwrite)
        except OutputError as exc:
            raise PipelineError(str(exc)) from None
        if not self.state_path.is_file():
            return fresh
        state = json.loads(self.state_path.read_text())
        if state.get("settings") != fresh["settings"]:
            if not self.config.overwrite:
                changed = sorted(
                    key for key in fresh["settings"] if state.get("settings", {}).get(key) != fresh["settings"][key]
                )
                raise PipelineError(
                    f"{self.root} holds a run with other settings ({', '.join(changed)}); "
                    "use another --output or pass --overwrite"
                )
            return fresh
        return state

    def is_done(self, stage: str) -> bool:
        """Whether ``stage`` finished and its outputs still carry the recorded checksums."""
        record = self.state["stages"].get(stage)
        if not record:
            return False
        for relative, digest in record["outputs"].items():
            path = self.root / relative
            if not path.is_file() or sha256_file(path) != digest:
                return False
        if stage == "lm_eval":
            recorded = json.loads(self.lm_eval_file.read_text()).get("settings")
            return self.config.lm_eval is not None and recorded == self.config.lm_eval.fingerprint()
        return True

    def _record(self, stage: str, outputs: list[Path], seconds: float) -> None:
        checksums = {}
        for output in outputs:
            for relative, digest in tree_checksums(output).items():
                path = output if output.is_file() else output / relative
                checksums[str(path.relative_to(self.root))] = digest
        self.state["stages"][stage] = {"seconds": round(seconds, 3), "outputs": checksums}
        atomic_write_json(self.state, self.state_path)

    def _invalidate_from(self, stage: str) -> None:
        """A stage that reruns makes every later stage's record stale."""
        for later in STAGES[STAGES.index(stage):]:
            self.state["stages"].pop(later, None)

    def inputs(self) -> dict[str, str]:
        """The run's inputs that no output may overlap."""
        return {"model folder": self.config.model}

    def check_inputs(self) -> None:
        """Everything checkable before calibration work: model folder and family, pruning budget, room for the
        outputs, quantizability (with --quantize) and the held-out text (with --eval-dataset)."""
        from .models.loading import load_config
        from .prune import check_prune_budget

        c = self.config
        config = load_config(c.model)
        check_model_folder(c.model, need_tokenizer=True)
        check_prune_budget(config, prune_config(c))
        weights = weights_bytes(c.model)
        check_output_location(self.root, weights + (weights // 2 if c.quantize else 0))
        if c.quantize:
            from .quantize import auto_round_version, check_group_size

            auto_round_version()
            check_group_size(config, quant_config(c).group_size)
        if c.eval_dataset:
            from .data import check_dataset_spec

            check_dataset_spec(c.eval_dataset)
        if c.lm_eval and not self.is_done("lm_eval"):
            from .evaluate.harness import check_tasks

            check_tasks(c.lm_eval)

    def run(self) -> dict[str, Any]:
        """Run (or resume) every chosen stage; returns the summary dictionary."""
        with output_lock(self.root):  # a second run on the same --output is refused at once
            clean_leftovers(self.root)
            self.state = self._load_state()  # another run may have finished since this object was made
            self.check_inputs()
            self.root.mkdir(parents=True, exist_ok=True)
            clean_folder_leftovers(self.root)
            write_marker(self.root, "run")
            atomic_write_json(self.state, self.state_path)
            return self._run_stages()

    def _run_stages(self) -> dict[str, Any]:
        actions: dict[str, Callable[[], list[Path]]] = {
            "observe": self._observe,
            "prune": self._prune,
            "quantize": self._quantize,
            "eval": self._evaluate,
            "lm_eval": self._lm_eval,
        }
        stages = self.config.stages()
        with tqdm(stages, desc="reap-fast run", unit="stage", disable=not self.config.progress) as bar:
            for stage in bar:
                bar.set_postfix(stage=stage)
                if self.is_done(stage):
                    logger.info("%s: already complete, skipped", stage)
                    continue
                self._invalidate_from(stage)
                start = time.perf_counter()
                outputs = actions[stage]()
                self._record(stage, outputs, time.perf_counter() - start)
        return self.summary()

    def _observe(self) -> list[Path]:
        from .observe import observe_checkpoint

        observe_checkpoint(self.config.model, self.config.dataset, self.observation, observe_config(self.config))
        return [self.observation]

    def _prune(self) -> list[Path]:
        from .prune import prune_checkpoint

        c = self.config
        folder = prune_checkpoint(c.model, self.observation, self.pruned, prune_config(c))
        write_pruning_picture(self.observation, folder)
        return [folder]

    def _quantize(self) -> list[Path]:
        from transformers import AutoTokenizer

        from .data import calibration_texts
        from .quantize import run_quantize_subprocess

        c = self.config
        tokenizer = AutoTokenizer.from_pretrained(self.pruned)
        quant = quant_config(c)
        texts = calibration_texts(c.dataset, tokenizer, quant.nsamples, seed=quant.seed)
        folder = run_quantize_subprocess(self.pruned, self.quantized, texts, quant)
        return [Path(folder)]

    def _evaluate(self) -> list[Path]:
        from transformers import AutoTokenizer

        from .data import calibration_texts
        from .evaluate.heldout import perplexity_in_child

        c = self.config
        evaluation = c.evaluation()
        tokenizer = AutoTokenizer.from_pretrained(self.pruned)
        texts = calibration_texts(evaluation.dataset, tokenizer, evaluation.samples, seed=c.seed)
        texts_file = atomic_write_json(texts, self.root / "eval_texts.json")
        models = {"original": c.model, "pruned": str(self.pruned)}
        if c.quantize:
            models["w4a16"] = str(self.quantized)
        results = {
            name: perplexity_in_child(path, texts_file, evaluation, quantized=(name == "w4a16"))
            for name, path in models.items()
        }
        texts_file.unlink()
        return [atomic_write_json(results, self.eval_file)]

    def _lm_eval(self) -> list[Path]:
        """lm-eval tasks on every model; a model's result is reused while its recorded checksums are unchanged."""
        stages = self.state["stages"]
        models = [ModelEntry("original", self.config.model),
                  ModelEntry("pruned", str(self.pruned), stages["prune"]["outputs"])]
        if self.config.quantize:
            models.append(ModelEntry("w4a16", str(self.quantized), stages["quantize"]["outputs"]))
        comparison = Comparison(models, self.config.lm_eval, cache_dir=self.root / "lm_eval")
        run_comparison(comparison, self.lm_eval_file)
        return [self.lm_eval_file]

    def summary(self) -> dict[str, Any]:
        """Experts kept per layer, sizes on disk, seconds per stage, perplexities."""
        report: dict[str, Any] = {
            "seconds": {stage: record["seconds"] for stage, record in self.state["stages"].items()},
            "size_bytes": {"original": size_on_disk(self.config.model), "pruned": size_on_disk(self.pruned)},
        }
        if self.quantized.is_dir():
            report["size_bytes"]["w4a16"] = size_on_disk(self.quantized)
        experts_file = self.pruned / "pruned_experts.json"
        if experts_file.is_file():
            layers = json.loads(experts_file.read_text())
            layers = layers.get("layers", layers)
            report["experts_kept"] = {layer: len(entry["kept"]) for layer, entry in layers.items()}
        if self.eval_file.is_file():
            report["eval"] = json.loads(self.eval_file.read_text())
        if picture_path(self.pruned).is_file():
            report["picture"] = str(picture_path(self.pruned))
        if self.config.lm_eval and self.lm_eval_file.is_file():
            report["lm_eval"] = json.loads(self.lm_eval_file.read_text())
        return report


def format_summary(summary: dict[str, Any]) -> str:
    """The end-of-run report as text."""
    lines = ["stage times: " + ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in summary["seconds"].items())]
    lines.append("size on disk: " + ", ".join(f"{name} {human_size(size)}" for name, size in summary["size_bytes"].items()))
    if "experts_kept" in summary:
        kept = summary["experts_kept"]
        lines.append("experts kept per layer: " + ", ".join(f"{layer}:{count}" for layer, count in kept.items()))
    if "picture" in summary:
        lines.append(f"picture of the pruning: {summary['picture']}")
    if "eval" in summary:
        lines.append(f"{'model':<10} {'perplexity':>11} {'next-token acc':>15}")
        for name, values in summary["eval"].items():
            lines.append(f"{name:<10} {values['perplexity']:>11.3f} {values['next_token_accuracy']:>15.4f}")
    if "lm_eval" in summary:
        lines.append("lm-eval tasks:")
        lines.append(format_table(summary["lm_eval"]["comparison"], list(summary["lm_eval"]["models"])))
    return "\n".join(lines)
