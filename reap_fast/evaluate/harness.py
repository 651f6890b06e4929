"""lm-evaluation-harness tasks on one model folder, in this process or in a child process.

``lm-eval`` (``pip install 'reap-fast[eval]'``) is called through its Python API,
``lm_eval.simple_evaluate(model="hf", model_args={"pretrained": folder, ...})``: the same Hugging Face
backend, task definitions, few-shot sampling and seeds as ``lm_eval --model hf --model_args
pretrained=folder``, so a number here is the number lm-eval users know. Every model is evaluated in its
own child process (``python -m reap_fast.evaluate.harness``): loading an auto-round W4A16 checkpoint patches
transformers' MoE classes for the whole process, and a child keeps each model's memory separate.

Results of one model (``evaluate_model``) keep lm-eval's own keys, e.g.
``{"results": {"arc_easy": {"acc,none": 0.71, "acc_stderr,none": 0.01, ...}}, "n-shot": ..., ...}``;
:mod:`reap_fast.evaluate.comparison` compares several models' results.

The child is ``python -m reap_fast.evaluate.harness REQUEST.json``: the request names the model folder,
the :class:`~reap_fast.config.HarnessSettings` fields and the result file
(:func:`reap_fast.children.write_request`).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..children import call_child, child_argv, child_main, read_request, write_request
from ..config.evaluate import HarnessError, HarnessSettings
from ..errors import ReapFastError, one_line
from ..fileio import atomic_write_json
from ..logs import configure_logging

INSTALL_HINT = "pip install 'reap-fast[eval]'"
MODULE = "reap_fast.evaluate.harness"
RESULT_KEYS = ("results", "n-shot", "n-samples", "versions", "higher_is_better", "group_subtasks")


def lm_eval_version() -> str:
    """The installed lm-eval version; :class:`HarnessError` with the install line when it is missing."""
    if importlib.util.find_spec("lm_eval") is None:
        raise HarnessError(f"lm-eval is not installed ({INSTALL_HINT})")
    return importlib.metadata.version("lm_eval")


def is_available() -> bool:
    """Whether lm-eval can be imported."""
    return importlib.util.find_spec("lm_eval") is not None


def is_task_file(task: str) -> bool:
    """A task given as the path of its YAML file (lm-eval accepts those as task names)."""
    return task.endswith((".yaml", ".yml")) and Path(task).is_file()


def task_manager(settings: HarnessSettings):
    """lm-eval's TaskManager over its own tasks plus ``include_path``.

    When every requested task is a YAML file or is defined under ``include_path``, lm-eval's thousands
    of built-in task files are not indexed (the same tasks are found, only faster).
    """
    from lm_eval.tasks import TaskManager

    named = [task for task in settings.tasks if not is_task_file(task)]
    local = TaskManager(include_path=settings.include_path, include_defaults=False)
    if all(task in local.all_tasks for task in named):
        return local
    return TaskManager(include_path=settings.include_path)


def check_tasks(settings: HarnessSettings, without: str = "") -> None:
    """Fail with one line, before any long work, when lm-eval is missing, a task is unknown or a task's data
    cannot be loaded (a hub dataset offline, a missing data file); ``without`` names how to go on without
    the evaluation (e.g. "pass --do_eval false"), added to that line.

    Loading the tasks downloads their datasets into the Hugging Face cache, where the evaluation finds them.
    """
    lm_eval_version()
    manager = task_manager(settings)
    known = set(manager.all_tasks)
    unknown = [task for task in settings.tasks if task not in known and not is_task_file(task)]
    if unknown:
        where = f" (searched lm-eval's tasks and {settings.include_path})" if settings.include_path else ""
        raise HarnessError(f"unknown lm-eval task(s) {', '.join(unknown)}{where}; `lm_eval ls tasks` lists them")
    try:
        _load_tasks(manager, list(settings.tasks))
    except Exception as error:  # lm-eval and datasets raise many types: offline hub, missing files, bad YAML
        hint = f"; {without}" if without else ""
        raise HarnessError(
            f"the data of lm-eval task(s) {', '.join(settings.tasks)} cannot be loaded ({type(error).__name__}: "
            f"{one_line(error)}){hint}"
        ) from None


def _load_tasks(manager, tasks: list[str]) -> None:
    """Build the tasks as the evaluation will (their datasets loaded), discarding them."""
    if hasattr(manager, "load"):
        manager.load(tasks)
        return
    from lm_eval.tasks import get_task_dict  # lm-eval before TaskManager.load

    get_task_dict(tasks, manager)


def model_arguments(model_dir: str, settings: HarnessSettings) -> dict[str, Any]:
    """``model_args`` of lm-eval's HF backend for a local folder."""
    from ..devices import resolve_device

    return {"pretrained": str(model_dir), "device": resolve_device(settings.device), "dtype": settings.dtype}


def evaluate_model(model_dir: str | os.PathLike, settings: HarnessSettings) -> dict[str, Any]:
    """Run the tasks on one model folder in this process; returns lm-eval's results (the keys above)."""
    version = lm_eval_version()
    import lm_eval
    import lm_eval.evaluator

    # lm-eval records the git commit of the current folder; outside a repository git prints "fatal: not a git
    # repository" on our stderr. The commit of whatever folder the user stands in says nothing about the run.
    if hasattr(lm_eval.evaluator, "get_git_commit_hash"):
        lm_eval.evaluator.get_git_commit_hash = lambda: None

    seeds = {}
    if settings.seed is not None:
        seeds = {name: settings.seed for name in ("random_seed", "numpy_random_seed", "torch_random_seed",
                                                   "fewshot_random_seed")}
    limit = settings.limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    output = lm_eval.simple_evaluate(
        model="hf",
        model_args=model_arguments(str(model_dir), settings),
        tasks=list(settings.tasks),
        num_fewshot=settings.num_fewshot,
        batch_size=settings.batch_size,
        limit=limit,
        task_manager=task_manager(settings),
        log_samples=False,
        **seeds,
    )
    result = {key: output[key] for key in RESULT_KEYS if key in output}
    result["lm_eval_version"] = version
    result["model"] = str(model_dir)
    return plain(result)


def plain(value: Any) -> Any:
    """JSON-safe copy (numpy scalars and other objects become floats or strings)."""
    return json.loads(json.dumps(value, default=lambda item: item.item() if hasattr(item, "item") else str(item)))


def evaluate_in_child(model_dir: str | os.PathLike, settings: HarnessSettings) -> dict[str, Any]:
    """:func:`evaluate_model` in a child ``python -m reap_fast.harness`` process.

    The child (which dies with this process) shows lm-eval's progress bars and log; a failed evaluation
    comes back as one :class:`HarnessError` line naming the model and the child's exception
    (:func:`reap_fast.children.call_child`).
    """
    with tempfile.TemporaryDirectory(prefix="reap-fast-lm-eval-") as scratch:
        result_file = Path(scratch) / "result.json"
        request = {"model_dir": str(model_dir), "settings": asdict(settings), "result_file": str(result_file)}
        call_child(child_argv(MODULE, write_request(scratch, request)), HarnessError, f"lm-eval on {model_dir}")
        return json.loads(result_file.read_text())


# --- child process -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    request = read_request(argv, f"python -m {MODULE}", __doc__.split("\n\n")[0])
    configure_logging("%(message)s")

    def work() -> None:
        settings = HarnessSettings(**request["settings"])
        try:
            result = evaluate_model(request["model_dir"], settings)
        except ReapFastError:
            raise
        except Exception as error:  # lm-eval failing on the user's task or model: one line, as lm-eval said it
            raise HarnessError(f"{type(error).__name__}: {one_line(error)}") from error
        atomic_write_json(result, request["result_file"])

    return child_main(work, f"python -m {MODULE}")


if __name__ == "__main__":
    sys.exit(main())
