"""A picture of what was pruned: per layer, the experts' REAP scores sorted, kept vs removed, and the
share of the calibration's routed tokens that the removed experts had received.

``reap-fast prune`` and ``reap-fast run`` write it beside the pruned model folder (``pruned/`` ->
``pruned.png``). The top panel shows, per layer, the removed experts' share of routed (token, expert)
pairs next to their share of the experts: a bar well below the dashed line means pruning removed
experts the calibration data rarely used. Below it, one small panel per layer: the REAP scores in
decreasing order, removed experts in orange. Drawn with matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch

from .fileio import atomic_write
from .metrics import LayerMetrics, load_metrics
from .outputs import LOCATION_ERRNOS, PNG_SOFTWARE, claim_output, describe_os_error

logger = logging.getLogger(__name__)

KEPT_COLOR = "#3b6ea8"
REMOVED_COLOR = "#e07b39"


@dataclass
class LayerPicture:
    """What one layer's panel shows."""

    layer: int
    scores: list[float]  # REAP scores, decreasing
    removed: list[bool]  # removed[i]: the expert with the i-th highest score was removed
    removed_token_share: float  # removed experts' routed (token, expert) pairs / all routed pairs
    removed_expert_share: float  # removed experts / experts


def picture_path(pruned_dir: str | os.PathLike) -> Path:
    """Where the picture of a pruned folder goes: beside it, named after it (``pruned/`` -> ``pruned.png``)."""
    folder = Path(pruned_dir)
    return folder.with_name(folder.name + ".png")


def layer_pictures(metrics: Mapping[int, LayerMetrics], removed: Mapping[int, Sequence[int]]) -> list[LayerPicture]:
    """Per layer: sorted REAP scores with removed flags, and the removed experts' share of routed tokens."""
    pictures = []
    for layer in sorted(removed):
        reap = metrics[layer]["reap"].double()
        frequency = metrics[layer]["expert_frequency"].double()
        gone = torch.zeros(reap.shape[0], dtype=torch.bool)
        gone[list(removed[layer])] = True
        order = torch.argsort(reap, descending=True, stable=True)
        routed = float(frequency.sum())
        pictures.append(LayerPicture(
            layer=int(layer),
            scores=reap[order].tolist(),
            removed=gone[order].tolist(),
            removed_token_share=float(frequency[gone].sum()) / routed if routed else 0.0,
            removed_expert_share=float(gone.sum()) / reap.shape[0],
        ))
    return pictures


def draw(pictures: Sequence[LayerPicture], title: str, path: str | os.PathLike) -> Path:
    """Draw the pictures as one PNG (written atomically); returns its path."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    columns = min(4, len(pictures))
    rows = math.ceil(len(pictures) / columns)
    figure = Figure(figsize=(3.4 * columns + 0.6, 3.2 + 2.3 * rows), dpi=110, layout="constrained")
    grid = figure.add_gridspec(rows + 1, columns, height_ratios=[1.25] + [1.0] * rows)
    figure.suptitle(title, fontsize=12)

    summary = figure.add_subplot(grid[0, :])
    layers = [picture.layer for picture in pictures]
    shares = [100 * picture.removed_token_share for picture in pictures]
    summary.bar(range(len(layers)), shares, color=REMOVED_COLOR, width=0.7)
    summary.step(
        [i - 0.5 for i in range(len(layers))] + [len(layers) - 0.5],
        [100 * p.removed_expert_share for p in pictures] + [100 * pictures[-1].removed_expert_share],
        where="post", color="#444444", linestyle="--", linewidth=1, label="share of experts removed",
    )
    summary.set_xticks(range(len(layers)), [str(layer) for layer in layers], fontsize=8 if len(layers) > 24 else 9)
    summary.set_xlim(-0.6, len(layers) - 0.4)
    summary.set_xlabel("layer")
    summary.set_ylabel("% of routed tokens")
    summary.set_title("share of the calibration's routed tokens that went to the removed experts", fontsize=10)
    summary.legend(loc="upper right", fontsize=8, frameon=False)
    if len(layers) <= 24:
        top = max(shares) or 1.0
        for x, share in enumerate(shares):
            inside = share > 0.15 * top  # written at mid-height, clear of the dashed line
            summary.annotate(f"{share:.1f}%", (x, share / 2 if inside else share), ha="center",
                             va="center" if inside else "bottom", fontsize=8, color="white" if inside else "black",
                             xytext=(0, 0 if inside else 2), textcoords="offset points")
    summary.set_ylim(0, max(max(shares), 100 * max(p.removed_expert_share for p in pictures)) * 1.25 + 1)

    for index, picture in enumerate(pictures):
        axes = figure.add_subplot(grid[1 + index // columns, index % columns])
        colors = [REMOVED_COLOR if gone else KEPT_COLOR for gone in picture.removed]
        axes.bar(range(len(picture.scores)), picture.scores, color=colors, width=0.85)
        axes.set_title(f"layer {picture.layer}: removed {sum(picture.removed)}/{len(picture.removed)}, "
                       f"{100 * picture.removed_token_share:.1f}% of tokens", fontsize=9)
        axes.set_xticks([])
        axes.tick_params(labelsize=7)
        if index % columns == 0:
            axes.set_ylabel("REAP score", fontsize=8)
        if index // columns == rows - 1:
            axes.set_xlabel("experts, highest score first", fontsize=8)
        if index == 0:
            axes.legend(handles=[Patch(color=KEPT_COLOR, label="kept"), Patch(color=REMOVED_COLOR, label="removed")],
                        loc="upper right", fontsize=8, frameon=False)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": PNG_SOFTWARE})  # how claim_output knows it
    return atomic_write(path, lambda handle: handle.write(buffer.getvalue()))


def check_picture(
    pruned_dir: str | os.PathLike, inputs: Mapping[str, str | os.PathLike | None] | None = None, overwrite: bool = False
) -> Path:
    """Before pruning: the picture's path may be written (not an input, not a user's file or folder)."""
    return claim_output(picture_path(pruned_dir), "picture", inputs, overwrite)


def write_pruning_picture(
    metrics_path: str | os.PathLike, pruned_dir: str | os.PathLike, overwrite: bool = True
) -> Path | None:
    """Draw the picture of a pruned folder (its ``pruned_experts.json``) from the observation it was pruned with.

    The path is checked again (:func:`check_picture`; ``overwrite``: an earlier picture of reap-fast may be
    replaced). Returns the PNG's path, or None with one warning line when matplotlib is not installed or the
    disk cannot take the picture (the pruned model is written by then and stays valid).
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        logger.info("pruning picture skipped: matplotlib is not installed (pip install matplotlib)")
        return None
    check_picture(pruned_dir, overwrite=overwrite)
    try:
        return _write_picture(metrics_path, pruned_dir)
    except OSError as exc:
        if exc.errno not in LOCATION_ERRNOS:
            raise
        logger.warning("pruning picture not written: %s (the pruned model is complete)", describe_os_error(exc))
        return None


def _write_picture(metrics_path: str | os.PathLike, pruned_dir: str | os.PathLike) -> Path:
    report = json.loads((Path(pruned_dir) / "pruned_experts.json").read_text())
    removed = {int(layer): entry["removed"] for layer, entry in report["layers"].items()}
    pictures = layer_pictures(load_metrics(metrics_path), removed)
    counts = sorted({sum(p.removed) for p in pictures})
    total = len(pictures[0].scores)
    count_text = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    method = report.get("method", "reap")
    title = f"{Path(str(report.get('source_model', pruned_dir))).name}: {count_text} of {total} experts removed per layer ({method})"
    path = draw(pictures, title, picture_path(pruned_dir))
    logger.info("pruning picture: %s", path)
    return path
