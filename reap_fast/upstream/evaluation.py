"""The drop-in's ``--do_eval`` step (upstream runs ``eval.run_evaluate`` on the pruned model).

reap-fast runs its lm-evaluation-harness part with the Hugging Face backend, as upstream does without a
vLLM server: the tasks of ``--lm_eval_tasks`` (``--run_lm_eval false`` skips them), ``num_fewshot`` 0 and
every seed set to ``--seed`` as upstream, batch size ``auto`` on CUDA and 1 on the CPU, each model in a
child process (:mod:`reap_fast.evaluate.harness`). Results land where upstream writes them:
``--results_dir`` or ``<pruned model>/eval``, file ``lm_eval_results.json``. EvalPlus, LiveCodeBench,
WildBench and the math suite are not run; one line says so. Without lm-eval one line says evaluation
was skipped and how to install it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config.evaluate import HarnessSettings
from ..evaluate import Comparison, ModelEntry, format_table, run_comparison
from ..evaluate import harness

OTHER_SUITES = (("run_evalplus", "EvalPlus"), ("run_livecodebench", "LiveCodeBench"), ("run_wildbench", "WildBench"),
                ("run_math", "math"))
RESULTS_FILE = "lm_eval_results.json"


def lm_eval_settings(eval_args: Any, seed: int, device: str) -> HarnessSettings | None:
    """The lm-eval settings (the harness part of :class:`~reap_fast.config.EvalConfig`) ``--do_eval`` implies,
    None when no task is asked for: upstream's choices (``num_fewshot`` 0, every seed ``--seed``, batch size
    ``auto`` on CUDA), the config's defaults otherwise."""
    from ..devices import resolve_device

    if not getattr(eval_args, "run_lm_eval", True) or not eval_args.lm_eval_tasks:
        return None
    batch_size = "auto" if resolve_device(device).startswith("cuda") else HarnessSettings.batch_size
    return HarnessSettings(tasks=list(eval_args.lm_eval_tasks), num_fewshot=0, batch_size=batch_size, seed=seed,
                           device=device)


def check_evaluation(eval_args: Any, seed: int, device: str) -> None:
    """Before any calibration work: the tasks exist (when lm-eval is installed; else nothing to check)."""
    settings = lm_eval_settings(eval_args, seed, device)
    if settings is not None and harness.is_available():
        harness.check_tasks(settings, without="pass --do_eval false to prune without evaluating")


def evaluate_pruned(pruned_dir: Path, eval_args: Any, seed: int, device: str = "auto") -> str:
    """Evaluate the pruned model in ``pruned_dir`` as ``--do_eval`` asks; returns the text printed."""
    lines = []
    not_run = [name for flag, name in OTHER_SUITES if getattr(eval_args, flag, False)]
    if not_run:
        lines.append(f"not run by reap-fast: {', '.join(not_run)} (lm-eval tasks only)")
    settings = lm_eval_settings(eval_args, seed, device)
    if settings is None:
        lines.append("lm-eval tasks skipped: none asked for (--run_lm_eval false or no --lm_eval_tasks)")
    elif not harness.is_available():
        lines.append(f"evaluation skipped: lm-eval is not installed ({harness.INSTALL_HINT}); "
                     f"tasks asked for: {', '.join(settings.tasks)} (--do_eval false silences this line)")
    else:
        results_dir = Path(eval_args.results_dir) if eval_args.results_dir else Path(pruned_dir) / "eval"
        comparison = Comparison([ModelEntry("pruned", str(pruned_dir))], settings)
        report = run_comparison(comparison, results_dir / RESULTS_FILE, overwrite=True, inside_models=True)
        lines.append(format_table(report["comparison"], ["pruned"]))
        lines.append(f"lm-eval results written to {results_dir / RESULTS_FILE}")
    text = "\n".join(lines)
    print(text)
    return text
