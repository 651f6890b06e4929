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

Those names (and ``observation.partial/``, ``eval_texts.json``) are :data:`RUN_FOLDER_NAMES`, the entries the
folder's marker lists; anything else in it is the user's and is never replaced.

A rerun skips every stage whose recorded outputs still exist with the recorded checksums, so an
interrupted run continues where it stopped; a folder's mere presence is never taken as done.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm

from .config import EvalConfig, ObserveConfig, PruneConfig, QuantConfig
from .config.declare import volatile_fields
from .errors import ReapFastError
from .evaluate.comparison import Comparison, ModelEntry, format_table, run_comparison
from .fileio import atomic_write_json, human_size, sha256_file, size_on_disk, tree_checksums
from .outputs import (
    check_not_overlapping,
    claim_output,
    clean_folder_leftovers,
    clean_leftovers,
    output_lock,
    write_marker,
)
from .picture import check_picture, picture_path, write_pruning_picture
from .preflight import check_model_folder, check_output_location

RUN_FOLDER_NAMES = ("observation.pt", "observation.partial", "pruned", "w4a16", "eval.json", "eval_texts.json",
                    "pruned.png", "lm_eval.json", "lm_eval", "pipeline.json")

logger = logging.getLogger(__name__)

STAGES = ("observe", "prune", "quantize", "eval", "lm_eval")


class PipelineError(ReapFastError, ValueError):
    """A pipeline setting or state that prevents the run (one-line message)."""


# The format of pipeline.json's "settings" (the fingerprint). Format 1 (reap-fast before this one) recorded flat
# names; a folder of another format is refused (0.x: start a new output folder).
FINGERPRINT_FORMAT = 2


@dataclass(frozen=True)
class PipelineConfig:
    """Settings of one ``reap-fast run``: the model, the calibration spec, the output folder and each stage's
    config (``quantize`` / ``evaluate`` None: no such stage). ``overwrite`` starts over in an output holding
    another run; ``observe.progress`` also shows the run's stage bar."""

    model: str
    dataset: str
    output: str
    observe: ObserveConfig = field(default_factory=ObserveConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    quantize: QuantConfig | None = None
    evaluate: EvalConfig | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        expected = {"observe": ObserveConfig, "prune": PruneConfig, "quantize": QuantConfig, "evaluate": EvalConfig}
        for stage, config_type in expected.items():
            value = getattr(self, stage)
            if not isinstance(value, config_type) and (value is not None or stage in ("observe", "prune")):
                raise PipelineError(f"{stage} must be {config_type.__name__}, got {type(value).__name__}")

    @property
    def progress(self) -> bool:
        """Whether progress bars are shown (the observation's setting)."""
        return self.observe.progress

    def fingerprint(self) -> dict[str, Any]:
        """The settings that determine the outputs (resuming with different ones is refused): every stage
        config's fields except the volatile ones (None for a stage that is off), with the format version."""
        stages = {"observe": self.observe, "prune": self.prune, "quantize": self.quantize, "evaluate": self.evaluate}
        settings: dict[str, Any] = {"format": FINGERPRINT_FORMAT, "model": self.model, "dataset": self.dataset}
        for stage, config in stages.items():
            settings[stage] = None if config is None else stage_settings(config)
        return settings

    def stages(self) -> list[str]:
        chosen = ["observe", "prune"]
        if self.quantize:
            chosen.append("quantize")
        if self.evaluate and self.evaluate.dataset:
            chosen.append("eval")
        if self.evaluate and self.evaluate.harness:
            chosen.append("lm_eval")
        return chosen


def stage_settings(config: Any) -> dict[str, Any]:
    """A stage config's fields that determine its outputs (all but :func:`volatile_fields`)."""
    volatile = volatile_fields(type(config))
    return {item.name: getattr(config, item.name) for item in fields(config) if item.name not in volatile}


def changed_settings(recorded: dict[str, Any], fresh: dict[str, Any]) -> list[str]:
    """The fingerprint entries whose values differ, as ``stage.field`` (or the top-level key)."""
    changed = []
    for key in sorted({*recorded, *fresh}):
        old, new = recorded.get(key), fresh.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changed += [f"{key}.{name}" for name in sorted({*old, *new}) if old.get(name) != new.get(name)]
        elif old != new:
            changed.append(key)
    return changed


class Pipeline:
    """Runs the stages of a :class:`PipelineConfig` with resume by checksummed outputs."""

    def __init__(self, config: PipelineConfig) -> None:
        if not isinstance(config, PipelineConfig):  # its stage configs validated themselves
            raise PipelineError(f"expected a PipelineConfig, got {type(config).__name__}")
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
        check_not_overlapping(self.root, self.inputs())  # an OutputError, kept: one line naming the path
        if not self.state_path.is_file():
            claim_output(self.root, "run folder", self.inputs(), self.config.overwrite)
        if not self.state_path.is_file():
            return fresh
        state = json.loads(self.state_path.read_text())
        recorded = state.get("settings", {})
        if recorded.get("format") != FINGERPRINT_FORMAT:
            if not self.config.overwrite:
                raise PipelineError(
                    f"{self.root} holds a run of an earlier reap-fast (run-folder format {recorded.get('format', 1)}, "
                    f"this one reads {FINGERPRINT_FORMAT}); start a new --output folder (or --overwrite to start over)"
                )
            return fresh
        changed = changed_settings(recorded, fresh["settings"])
        if changed:
            if not self.config.overwrite:
                raise PipelineError(
                    f"{self.root} holds a run with other settings ({', '.join(changed)}); "
                    "use another --output or pass --overwrite"
                )
            return fresh
        return state

    def quant_settings(self) -> QuantConfig:
        """The quantize settings of this run: an earlier, interrupted OUTPUT/w4a16 is replaced."""
        if self.config.quantize is None:
            raise PipelineError("this run has no quantize stage")
        return replace(self.config.quantize, overwrite=True)

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
            harness = self.config.evaluate.harness if self.config.evaluate else None
            return harness is not None and recorded == harness.fingerprint()
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
        from .prune import check_prune_budget, pruned_size

        c = self.config
        config = load_config(c.model)
        check_model_folder(c.model, need_tokenizer=True)
        removed = check_prune_budget(config, c.prune)
        needed = pruned_size(c.model, config, removed)  # what is really written: pruned, then its W4A16 form
        if c.quantize:
            needed += pruned_size(c.model, config, removed, (c.quantize.bits, c.quantize.group_size))
        check_output_location(self.root, needed)
        check_picture(self.pruned, self.inputs(), overwrite=True)  # a user's pruned.png stops the run here
        if c.quantize:
            from .quantize import auto_round_version, check_group_size

            auto_round_version()
            check_group_size(config, c.quantize.group_size)
        evaluation = c.evaluate or EvalConfig()
        if evaluation.dataset:
            from .data import check_dataset_spec

            check_dataset_spec(evaluation.dataset)
        if evaluation.harness and not self.is_done("lm_eval"):
            from .evaluate.harness import check_tasks

            check_tasks(evaluation.harness, without="run without --eval-tasks to skip the evaluation")

    def run(self) -> dict[str, Any]:
        """Run (or resume) every chosen stage; returns the summary dictionary."""
        check_output_location(self.root, 0)  # before the lock: a read-only place is one line, not a traceback
        with output_lock(self.root):  # a second run on the same --output is refused at once
            clean_leftovers(self.root)
            self.state = self._load_state()  # another run may have finished since this object was made
            self.check_inputs()
            self.root.mkdir(parents=True, exist_ok=True)
            clean_folder_leftovers(self.root)
            write_marker(self.root, "run", list(RUN_FOLDER_NAMES))
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

        settings = replace(self.config.observe, checkpoint_dir=str(self.root / "observation.partial"), resume=True)
        observe_checkpoint(self.config.model, self.config.dataset, self.observation, settings)
        return [self.observation]

    def _prune(self) -> list[Path]:
        from .prune import prune_checkpoint

        c = self.config
        folder = prune_checkpoint(c.model, self.observation, self.pruned, replace(c.prune, overwrite=True))
        write_pruning_picture(self.observation, folder, overwrite=True)
        return [folder]

    def _quantize(self) -> list[Path]:
        from .quantize import quantize_texts, run_quantize_subprocess

        c = self.config
        quant = self.quant_settings()
        # the default 128 texts shrink to what the data holds (with a warning); another count is refused
        texts, quant = quantize_texts(self.pruned, c.dataset, quant, explicit=quant.nsamples != QuantConfig.nsamples)
        folder = run_quantize_subprocess(self.pruned, self.quantized, texts, quant)
        return [Path(folder)]

    def _evaluate(self) -> list[Path]:
        from transformers import AutoTokenizer

        from .data import calibration_texts
        from .evaluate.heldout import perplexity_in_child

        c = self.config
        evaluation = c.evaluate
        tokenizer = AutoTokenizer.from_pretrained(self.pruned)
        texts = calibration_texts(evaluation.dataset, tokenizer, evaluation.samples, seed=c.observe.seed)
        texts_file = atomic_write_json(texts, self.root / "eval_texts.json")
        models = {"original": c.model, "pruned": str(self.pruned)}
        if c.quantize:
            models["w4a16"] = str(self.quantized)
        results = {}
        with tqdm(models.items(), desc="eval (perplexity)", unit="model", disable=not c.progress) as bar:
            for name, path in bar:  # one child per model, seconds to minutes each: the bar says which one runs
                bar.set_postfix(model=name)
                results[name] = perplexity_in_child(path, texts_file, evaluation, quantized=(name == "w4a16"))
        texts_file.unlink()
        return [atomic_write_json(results, self.eval_file)]

    def _lm_eval(self) -> list[Path]:
        """lm-eval tasks on every model; a model's result is reused while its recorded checksums are unchanged."""
        stages = self.state["stages"]
        models = [ModelEntry("original", self.config.model),
                  ModelEntry("pruned", str(self.pruned), stages["prune"]["outputs"])]
        if self.config.quantize:
            models.append(ModelEntry("w4a16", str(self.quantized), stages["quantize"]["outputs"]))
        comparison = Comparison(models, self.config.evaluate.harness, cache_dir=self.root / "lm_eval")
        run_comparison(comparison, self.lm_eval_file, overwrite=True)
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
        if "lm_eval" in self.config.stages() and self.lm_eval_file.is_file():
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
