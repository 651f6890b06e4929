"""Layer streaming: observe a model bigger than the accelerator, one decoder layer at a time.

The model is built as a skeleton without weights (parameters on the ``meta`` device; non-persistent
buffers such as the rotary ``inv_freq`` are computed on the host as usual). Then:

1. the input embeddings are loaded, every calibration sequence is embedded into the *hidden-states
   buffer* (N, L, H), and the embedding matrix is freed;
2. for each decoder layer ``i``: only that layer's tensors are read from the checkpoint's safetensors
   shards (byte ranges from the headers; the index json says which shard holds a key), per-expert tensors
   are written into the fused ``gate_up_proj`` (E, 2I, H) / ``down_proj`` (E, H, I) layout exactly as the
   transformers weight conversion does at load time, the layer is put into the model, all calibration
   batches run through it with the :class:`Observer`'s probes active (the same statistics code as an
   in-memory run), each batch's output overwrites its input rows in the buffer (the next layer's
   input), and the layer's weights are freed. The final norm and the LM head are never loaded: the
   statistics end at the last MoE block.

Exactness: every batch goes through the *model's own forward* (``model.model(inputs_embeds=...,
attention_mask=...)``) with all decoder layers but the current one replaced by pass-through modules
and the final norm by an identity. The causal + padding mask (and, for hybrid models, the per-layer
mask choice), position ids and rotary embeddings are therefore built by transformers' own code, as in
a full forward; layer ``i`` sees the same inputs, the same mask and the same position embeddings as
in an in-memory run, and the statistics agree to float rounding (tests: rtol 1e-5 in fp32).

Where the hidden-states buffer lives is chosen from free memory (logged, and injectable for tests
through :class:`MemoryBudget`): on the accelerator when it fits next to one layer and one batch's
activations, else in pinned host memory, else in a memory-mapped file on disk (CPU runs: host memory,
else disk).

I/O is hidden (:mod:`.prefetch`): the next layer's tensors are read (and on a GPU copied to it from pinned
memory) on a background thread while the current layer computes, into two reused arenas, so at most two
layers are in flight. Whether to stream at all is the memory plan's decision
(:mod:`reap_fast.models.memory_plan`, which holds the peak-memory formula; ``layerwise="auto"``).

Peak memory::

    accelerator ≈ max(W_embed, 2 x W_layer) + A_batch + S_hidden   (S_hidden only when the buffer is on it)
    host        ≈ 2 x W_layer (this layer and the next, read ahead) + S_hidden (pinned / host tier)

    W_layer  = weights of the largest decoder layer      = (3·E·H·I + attention + router) · b
    W_embed  = V · H · b (only while embedding, before layer 0)
    S_hidden = N · L · H · b (all calibration sequences' hidden states, updated in place)
    A_batch  ≈ B · L · ((6 + 3k) · H + 2 · n_heads · d_head) · b + B · L · E · 4
               (+ B · n_heads · L² · b when the attention implementation materialises scores)

with b bytes per element, N sequences of L tokens, batch size B, E experts of intermediate size I,
top-k k, hidden size H, vocabulary V. It does not grow with the number of layers. Qwen3-30B-A3B in
bf16, 231 x 2048 tokens: W_layer ≈ 1.25 GB, W_embed ≈ 0.62 GB, S_hidden ≈ 1.94 GB, so about 4.5 GB
of accelerator memory plus activations, instead of 61 GB for the whole model.

Supported families: those whose adapter entry has a ``streaming`` layout (``STREAMING_FAMILIES``,
checked exact against the in-memory forward); the layout says how the family's checkpoint names its
tensors (renames, per-expert tensors to fuse). Others are refused with a clear message.

Modules: ``memory`` (tier choice, the hidden-states buffer), ``reader`` (one layer's tensors from the
safetensors shards, experts fused: :mod:`reap_fast.models.weights`), ``prefetch`` (the next layer read
ahead), ``placement`` (weights into the skeleton and out,
byte accounting), ``skeleton`` (the meta-device model, its layer list, stand-ins, supported families),
``loop`` (:func:`observe_streaming`).
"""

from .errors import StreamingError
from .loop import observe_streaming
from .memory import HiddenStore, MemoryBudget, choose_hidden_tier, free_memory, host_available_bytes
from .placement import StreamingReport, materialize, release
from .reader import CheckpointTensors, layer_tensors
from .skeleton import STREAMING_FAMILIES, StreamingObserver, build_skeleton, decoder_layers, streaming_supported

__all__ = [
    "STREAMING_FAMILIES",
    "CheckpointTensors",
    "HiddenStore",
    "MemoryBudget",
    "StreamingError",
    "StreamingObserver",
    "StreamingReport",
    "build_skeleton",
    "choose_hidden_tier",
    "decoder_layers",
    "free_memory",
    "host_available_bytes",
    "layer_tensors",
    "materialize",
    "observe_streaming",
    "release",
    "streaming_supported",
]
