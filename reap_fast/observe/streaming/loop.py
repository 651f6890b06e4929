"""The streaming loop: embed every sequence once, then run all batches through one decoder layer at a time.

See the package docstring (:mod:`reap_fast.observe.streaming`) for the exactness argument and the
peak-memory formula.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig

from ...config import ObserveConfig
from ...metrics import LayerAccumulator
from ...models.loading import DTYPES
from ..checkpointing import ObservationCheckpointer, accumulator_states, restore_accumulators
from ..progress import TokenRate
from ..settings import process_settings
from .errors import StreamingError
from .memory import GiB, HiddenStore, MemoryBudget, activation_bytes, choose_hidden_tier, free_memory
from .placement import StreamingReport, materialize, release
from .prefetch import LayerPrefetcher
from .reader import CheckpointTensors
from .skeleton import PassThrough, StreamingObserver, build_skeleton, decoder_layers, parameter_name, streaming_supported

logger = logging.getLogger(__name__)


@torch.no_grad()
def observe_streaming(
    model_path: str | os.PathLike,
    calibration,
    settings: ObserveConfig,
    *,
    checkpointer: ObservationCheckpointer | None = None,
    resume_state: dict[str, Any] | None = None,
    memory_budget: MemoryBudget | None = None,
    scratch_dir: str | os.PathLike | None = None,
    report: StreamingReport | None = None,
) -> dict[int, LayerAccumulator]:
    """Observe ``calibration`` with the checkpoint at ``model_path`` streamed layer by layer.

    :func:`reap_fast.observe.observe_checkpoint` with ``layerwise=True`` calls this; ``settings`` gives the
    batch size, engine, renormalisation, device, dtype and progress ('auto' resolved here). Returns the
    accumulators {layer index: LayerAccumulator} on the device. ``checkpointer`` / ``resume_state``: see
    :mod:`reap_fast.observe.checkpointing`; ``memory_budget`` replaces the measured free memory (tests);
    ``scratch_dir`` holds a disk-tier hidden-states file; ``report`` receives the tier and weight bytes.
    """
    stream = _LayerStream(model_path, calibration, settings, report if report is not None else StreamingReport())
    tier = stream.plan_tier(memory_budget)
    stream.prepare_base()
    stream.open(tier, scratch_dir)
    try:
        with stream.observer:
            stream.detach_layers()
            start_layer, start_batch = stream.resume_or_embed(checkpointer, resume_state)
            total = len(stream.real_layers) * stream.num_batches
            with tqdm(total=total, initial=start_layer * stream.num_batches + start_batch, unit="batch",
                      desc="stream", disable=not stream.settings.progress) as bar:
                for index in range(start_layer, len(stream.real_layers)):
                    stream.observe_layer(index, start_batch if index == start_layer else 0, bar, checkpointer)
    finally:
        stream.close()
    return stream.observer.accumulators


class _LayerStream:
    """One streamed observation, step by step: the meta skeleton, the hidden-states tier, the embedding, the
    layer loop (one decoder layer's weights on the device at a time) and the checkpoint state."""

    def __init__(self, model_path: str | os.PathLike, calibration, settings: ObserveConfig,
                 report: StreamingReport) -> None:
        """Open the checkpoint and build the meta skeleton ('auto' settings resolved; no weight is read)."""
        self.config = AutoConfig.from_pretrained(model_path)
        self.layout = streaming_supported(self.config)
        self.settings = process_settings(settings, self.config)
        self.device, self.dtype = torch.device(self.settings.device), DTYPES[self.settings.dtype]
        self.calibration, self.report = calibration, report
        self.reader = CheckpointTensors(model_path)
        self.model = build_skeleton(self.config, self.dtype)
        self.base, self.layers, self.layers_name = decoder_layers(self.model)
        self.real_layers = list(self.layers)
        self.element = torch.empty((), dtype=self.dtype).element_size()
        report.layer_bytes = [sum(p.numel() for p in layer.parameters()) * self.element for layer in self.real_layers]
        self.count = calibration.input_ids.shape[0]
        self.num_batches = -(-self.count // self.settings.batch_size)

    def plan_tier(self, memory_budget: MemoryBudget | None) -> str:
        """Where every sequence's hidden states live (device, host or disk), from the free memory; logged."""
        config, report = self.config, self.report
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        count, length = self.calibration.input_ids.shape
        self.hidden_shape = (count, length, int(text_config.hidden_size))
        store_bytes = count * length * self.hidden_shape[2] * self.element
        budget = memory_budget if memory_budget is not None else free_memory(self.device)
        batch_bytes = activation_bytes(config, self.settings.batch_size, length, self.element)
        reserve = 2 * max(report.layer_bytes) + batch_bytes + GiB // 2
        tier = choose_hidden_tier(store_bytes, self.device, budget, reserve)
        report.tier, report.hidden_bytes, report.budget = tier, store_bytes, budget
        logger.info(
            "layer streaming: hidden states of %d x %d tokens = %.3f GiB -> %s (free: device %s, host %s; reserve "
            "%.2f GiB for one layer of %.2f GiB and one batch)",
            count, length, store_bytes / GiB, tier,
            "n/a" if budget.device_free is None else f"{budget.device_free / GiB:.1f} GiB",
            "n/a" if budget.host_free is None else f"{budget.host_free / GiB:.1f} GiB",
            reserve / GiB, max(report.layer_bytes) / GiB,
        )
        return tier

    def prepare_base(self) -> None:
        """Find the embedding and the final norm, refuse other base-model parameters (rare), and move the
        host-computed buffers (rotary embeddings) to the device."""
        self.embedding = self.model.get_input_embeddings()
        self.embed_name = parameter_name(self.model, self.embedding.weight)
        self.norm = getattr(self.base, "norm", None)
        skip = {id(p) for p in self.embedding.parameters()}
        skip |= {id(p) for p in (self.norm.parameters() if self.norm is not None else [])}
        skip |= {id(p) for layer in self.real_layers for p in layer.parameters()}
        extras = [name for name, p in self.base.named_parameters() if id(p) not in skip]
        if extras:
            raise StreamingError(f"layer streaming does not handle the extra parameters {extras[:4]}")
        for module in self.base.modules():
            for leaf, buffer in list(module._buffers.items()):
                if buffer is not None and buffer.device.type != "meta":
                    module._buffers[leaf] = buffer.to(self.device)

    def open(self, tier: str, scratch_dir: str | os.PathLike | None) -> None:
        """The observer, the hidden-states store in ``tier`` and the prefetcher of the layers' weights."""
        settings = self.settings
        self.observer = StreamingObserver(self.model, settings.engine, settings.renormalize, self.device,
                                          settings.merging_statistics)
        self.store = HiddenStore(self.hidden_shape, self.dtype, tier, self.device, scratch_dir)
        self.prefetcher = LayerPrefetcher(self.reader, self.real_layers, self.layers_name, self.layout, self.device)

    def detach_layers(self) -> None:
        """The final norm and every decoder layer replaced by pass-throughs: the base model runs one layer."""
        if self.norm is not None:
            self.base.norm = nn.Identity()
        for index, layer in enumerate(self.real_layers):
            self.layers[index] = PassThrough(layer)

    def resume_or_embed(self, checkpointer: ObservationCheckpointer | None,
                        resume_state: dict[str, Any] | None) -> tuple[int, int]:
        """(first layer, first batch): restored from ``resume_state``, else (0, 0) after embedding every
        sequence (layer 0's weights are read meanwhile)."""
        if resume_state is not None:
            restore_accumulators(self.observer.accumulators, resume_state["accumulators"])
            start_layer, start_batch = int(resume_state["layer"]), int(resume_state["batches_done"])
            if start_layer < len(self.real_layers):
                self.store.restore(checkpointer.hidden_path(resume_state), resume_state["hidden"])
            return start_layer, start_batch
        if self.count:
            began = time.perf_counter()
            self.prefetcher.request(0)
            _embed_into(self.store, self.embedding, self.embed_name, self.reader, self.calibration,
                        self.settings.batch_size, self.report)
            _synchronize(self.device)
            self.report.embed_seconds += time.perf_counter() - began
        return 0, 0

    def checkpoint_state(self, layer: int, done: int) -> dict[str, Any]:
        """The resumable state after ``done`` batches of ``layer`` (a finished layer: the next one at batch 0)."""
        if done == self.num_batches:
            layer, done = layer + 1, 0
        return {
            "mode": "layerwise",
            "layer": layer,
            "layers_done": list(range(layer)),
            "batches_done": done,
            "accumulators": accumulator_states(self.observer.accumulators),
        }

    def observe_layer(self, index: int, first_batch: int, bar, checkpointer: ObservationCheckpointer | None) -> None:
        """Place layer ``index``'s weights (the next layer's read starts), run the batches from ``first_batch``
        through it (a checkpoint chance after each), then free it."""
        layer, report = self.real_layers[index], self.report
        began = time.perf_counter()
        placed = materialize(layer, self.prefetcher.take(index), self.device)
        report.load_seconds += time.perf_counter() - began  # the read time not hidden by compute
        self.prefetcher.request(index + 1)  # read while this layer computes: two layers in flight
        report.add(placed)
        self.layers[index] = layer
        bar.set_description(f"stream layer {index + 1}/{len(self.real_layers)}")
        rate = TokenRate()
        for batch in range(first_batch, self.num_batches):
            tokens = self.run_batch(batch)
            rate.advance(bar, tokens, batch=f"{batch + 1}/{self.num_batches}")
            if checkpointer is not None:
                checkpointer.after_batch(lambda: self.checkpoint_state(index, batch + 1), self.store.snapshot)
        _synchronize(self.device)
        report.compute_seconds += rate.elapsed()
        self.layers[index] = PassThrough(layer)
        report.remove(placed)
        release(layer)

    def run_batch(self, batch: int) -> int:
        """Batch ``batch``'s hidden states through the placed layer, in place in the store; its token count."""
        calibration, batch_size = self.calibration, self.settings.batch_size
        begin, end = batch * batch_size, min(self.count, (batch + 1) * batch_size)
        attention = calibration.attention_mask[begin:end].to(self.device)
        with self.observer.counting(calibration.stats_mask[begin:end]):
            output = self.base(inputs_embeds=self.store.read(begin, end), attention_mask=attention,
                               use_cache=False).last_hidden_state
        self.store.write(begin, end, output)
        return int(calibration.attention_mask[begin:end].sum())

    def close(self) -> None:
        """Put the final norm and the real layers back; close the prefetcher, the reader and the store."""
        if self.norm is not None:
            self.base.norm = self.norm
        for index, layer in enumerate(self.real_layers):
            self.layers[index] = layer
        self.prefetcher.close()
        self.reader.close()
        self.store.close()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _embed_into(
    store: HiddenStore,
    embedding: nn.Module,
    embed_name: str,
    reader: CheckpointTensors,
    calibration,
    batch_size: int,
    report: StreamingReport,
) -> None:
    """Embed every calibration sequence into ``store`` with the checkpoint's embedding matrix, then free it.

    ``embed_name`` is the matrix's checkpoint key; the embedding runs on the store's compute device.
    """
    device = store.device
    owner_name, _, _ = embed_name.rpartition(".")
    tensors = reader.load([embed_name])
    placed = materialize(embedding, {"weight": tensors.pop(embed_name)}, device)
    report.embed_bytes = placed
    report.add(placed)
    for begin in range(0, store.shape[0], batch_size):
        end = min(store.shape[0], begin + batch_size)
        store.write(begin, end, embedding(calibration.input_ids[begin:end].to(device)))
    release(embedding)
    report.remove(placed)
    logger.debug("embedded %d sequences with %s", store.shape[0], owner_name)
