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
from ...models import text_config
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
    report = report if report is not None else StreamingReport()
    config = AutoConfig.from_pretrained(model_path)
    layout = streaming_supported(config)
    settings = process_settings(settings, config)
    batch_size, device, dtype = settings.batch_size, torch.device(settings.device), DTYPES[settings.dtype]
    reader = CheckpointTensors(model_path)
    model = build_skeleton(config, dtype)
    base, layers, layers_name = decoder_layers(model)
    real_layers = list(layers)
    element = torch.empty((), dtype=dtype).element_size()
    report.layer_bytes = [sum(p.numel() for p in layer.parameters()) * element for layer in real_layers]

    count, length = calibration.input_ids.shape
    hidden = int(text_config(config).hidden_size)
    store_bytes = count * length * hidden * element
    budget = memory_budget if memory_budget is not None else free_memory(device)
    reserve = 2 * max(report.layer_bytes) + activation_bytes(config, batch_size, length, element) + GiB // 2
    tier = choose_hidden_tier(store_bytes, device, budget, reserve)
    report.tier, report.hidden_bytes, report.budget = tier, store_bytes, budget
    logger.info(
        "layer streaming: hidden states of %d x %d tokens = %.3f GiB -> %s (free: device %s, host %s; reserve %.2f GiB "
        "for one layer of %.2f GiB and one batch)",
        count, length, store_bytes / GiB, tier,
        "n/a" if budget.device_free is None else f"{budget.device_free / GiB:.1f} GiB",
        "n/a" if budget.host_free is None else f"{budget.host_free / GiB:.1f} GiB",
        reserve / GiB, max(report.layer_bytes) / GiB,
    )

    # Parts of the base model other than the layers, the embeddings and the final norm (rare).
    embedding = model.get_input_embeddings()
    embed_name = parameter_name(model, embedding.weight)
    norm = getattr(base, "norm", None)
    skip = {id(p) for p in embedding.parameters()} | {id(p) for p in (norm.parameters() if norm is not None else [])}
    skip |= {id(p) for layer in real_layers for p in layer.parameters()}
    extras = [name for name, p in base.named_parameters() if id(p) not in skip]
    if extras:
        raise StreamingError(f"layer streaming does not handle the extra parameters {extras[:4]}")
    for module in base.modules():  # rotary embeddings and other host-computed buffers
        for leaf, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.device.type != "meta":
                module._buffers[leaf] = buffer.to(device)

    observer = StreamingObserver(model, settings.engine, settings.renormalize, device, settings.merging_statistics)
    num_batches = -(-count // batch_size)
    start_layer, start_batch = 0, 0
    store = HiddenStore((count, length, hidden), dtype, tier, device, scratch_dir)
    prefetcher = LayerPrefetcher(reader, real_layers, layers_name, layout, device)
    saved_norm = norm
    try:
        with observer:
            if norm is not None:
                base.norm = nn.Identity()
            for index, layer in enumerate(real_layers):
                layers[index] = PassThrough(layer)
            if resume_state is not None:
                restore_accumulators(observer.accumulators, resume_state["accumulators"])
                start_layer, start_batch = int(resume_state["layer"]), int(resume_state["batches_done"])
                if start_layer < len(real_layers):
                    store.restore(checkpointer.hidden_path(resume_state), resume_state["hidden"])
            elif count:
                began = time.perf_counter()
                prefetcher.request(0)  # layer 0 is read while the sequences are embedded
                _embed_into(store, embedding, embed_name, reader, calibration, batch_size, report)
                _synchronize(device)
                report.embed_seconds += time.perf_counter() - began

            def state(layer: int, done: int) -> dict[str, Any]:
                if done == num_batches:
                    layer, done = layer + 1, 0
                return {
                    "mode": "layerwise",
                    "layer": layer,
                    "layers_done": list(range(layer)),
                    "batches_done": done,
                    "accumulators": accumulator_states(observer.accumulators),
                }

            total = len(real_layers) * num_batches
            with tqdm(total=total, initial=start_layer * num_batches + start_batch, unit="batch",
                      desc="stream", disable=not settings.progress) as bar:
                for index in range(start_layer, len(real_layers)):
                    layer = real_layers[index]
                    began = time.perf_counter()
                    placed = materialize(layer, prefetcher.take(index), device)
                    report.load_seconds += time.perf_counter() - began  # the read time not hidden by compute
                    prefetcher.request(index + 1)  # read while this layer computes: two layers in flight
                    report.add(placed)
                    layers[index] = layer
                    bar.set_description(f"stream layer {index + 1}/{len(real_layers)}")
                    rate = TokenRate()
                    first = start_batch if index == start_layer else 0
                    for batch in range(first, num_batches):
                        begin, end = batch * batch_size, min(count, (batch + 1) * batch_size)
                        attention = calibration.attention_mask[begin:end].to(device)
                        with observer.counting(calibration.stats_mask[begin:end]):
                            output = base(inputs_embeds=store.read(begin, end), attention_mask=attention,
                                          use_cache=False).last_hidden_state
                        store.write(begin, end, output)
                        del output
                        rate.advance(bar, int(calibration.attention_mask[begin:end].sum()),
                                     batch=f"{batch + 1}/{num_batches}")
                        if checkpointer is not None:
                            checkpointer.after_batch(lambda: state(index, batch + 1), store.snapshot)
                    _synchronize(device)
                    report.compute_seconds += rate.elapsed()
                    layers[index] = PassThrough(layer)
                    report.remove(placed)
                    release(layer)
    finally:
        if saved_norm is not None:
            base.norm = saved_norm
        for index, layer in enumerate(real_layers):
            layers[index] = layer
        prefetcher.close()
        reader.close()
        store.close()
    return observer.accumulators


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
