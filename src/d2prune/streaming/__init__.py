"""Models larger than memory: stream decoder layers from the safetensors shards, write pruned ones out.

The model is built on the meta device (no weights; buffers such as rotary frequencies are real).
Each decoder layer's tensors are read when its turn comes (``safe_open``, one shard file at a time,
copied into owned memory so no file mapping outlives the read), run and pruned by the same per-layer
code path as in-memory pruning (``d2prune.api.prune`` with a ``streaming.store.StreamedStore``), written to their own
output shard and freed. The embeddings are loaded for the layer-0 capture only; the output head never
is. The output is a normal sharded checkpoint (``model.safetensors.index.json``) that
``from_pretrained`` loads, with config, tokenizer and generation files copied and ``sparsity.json``.

Everything is written into ``.{name}.partial`` next to the output folder, which is renamed into place
only when complete. After each layer, ``progress.json`` there records the next layer, the tensors
written, the activation files and the RNG state; ``prune_checkpoint(..., resume=True)`` (CLI
``--resume OUT``) continues from it and gives a result identical to an uninterrupted run: from the
activation file when it was kept on disk, else by re-running the already pruned layers.

Modules: ``checkpoint`` (reading shards), ``model`` (the meta-device model), ``store`` (writing the
pruned layers), ``resume`` (progress and resuming), ``perplexity`` (streamed evaluation), ``run``
(``prune_checkpoint``).
"""

from d2prune.streaming.checkpoint import INDEX_FILE, Checkpoint, checkpoint_bytes, is_streamable, resolve_offload
from d2prune.streaming.model import StreamedModel, StreamingLayers, limit_heap_retention
from d2prune.streaming.perplexity import evaluate_streamed
from d2prune.streaming.resume import KILL_ENV, PROGRESS_FILE, RESUME_UNDER_TORCHRUN, read_progress, work_dir
from d2prune.streaming.run import prune_checkpoint
from d2prune.streaming.store import StreamedStore

__all__ = [
    "INDEX_FILE",
    "KILL_ENV",
    "PROGRESS_FILE",
    "RESUME_UNDER_TORCHRUN",
    "Checkpoint",
    "StreamedModel",
    "StreamedStore",
    "StreamingLayers",
    "checkpoint_bytes",
    "evaluate_streamed",
    "is_streamable",
    "limit_heap_retention",
    "prune_checkpoint",
    "read_progress",
    "resolve_offload",
    "work_dir",
]
