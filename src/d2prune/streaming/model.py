"""The meta-device model: a causal LM built without weights whose tensors load from the checkpoint on demand."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn

from d2prune.engine.architecture import DecoderStack, find_decoder_stack
from d2prune.engine.finite import check_weight
from d2prune.engine.walk import LayerStore
from d2prune.errors import UserError
from d2prune.io.folders import load_errors
from d2prune.streaming.checkpoint import Checkpoint, _torch_dtype, is_streamable


def limit_heap_retention(threshold: int = 4 << 20) -> None:
    """Have glibc serve blocks of ``threshold`` bytes and more straight from the OS and return them
    on free. By default its threshold grows to the size of freed blocks (up to 32 MiB), after which
    each layer's tensors come from the heap, which fragments and keeps growing layer after layer
    (measured: +28 MiB per 0.25B-model layer, none with this). No-op where there is no glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD (setting it also stops the growth)
        libc.mallopt(-1, 128 << 10)  # M_TRIM_THRESHOLD: back to glibc's default, which the growth raised
    except (OSError, AttributeError):
        pass


class StreamedModel:
    """A causal LM built without weights; parts of it are loaded from a checkpoint on demand.


    Tensor names are the model's own (``state_dict`` names, the first of tied ones), which are also
    the names the output checkpoint uses.
    """

    def __init__(self, folder: str | Path, dtype: str = "float32"):
        from accelerate import init_empty_weights
        from transformers import AutoConfig

        from d2prune.io.folders import is_image_classifier, model_class

        limit_heap_retention()
        self.folder = Path(folder).expanduser()
        if not is_streamable(self.folder):
            raise UserError(f"{self.folder} is not a model folder with config.json and safetensors weights")
        self.dtype = _torch_dtype(dtype)
        self.checkpoint = Checkpoint(self.folder)
        try:
            config = AutoConfig.from_pretrained(str(self.folder))
            # Buffers stay real: rotary frequencies and the like are computed, not stored.
            with init_empty_weights(include_buffers=False):
                # The config's task decides the class: a causal LM, or an image classifier (ViT, DeiT).
                cls = model_class(config)
                build = cls.from_config if hasattr(cls, "from_config") else cls._from_config  # Auto or concrete
                model = build(config, dtype=self.dtype)
        except load_errors() as exc:  # an architecture transformers does not know, a damaged config
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"could not build the model of {self.folder}: {reason}") from None
        model.tie_weights()
        model.eval()
        if not is_image_classifier(model):
            model.config.use_cache = False
        self.model = model
        self.stack: DecoderStack = find_decoder_stack(model)

        # Every slot a parameter occupies (tied weights occupy two), under its first name.
        self._slots: dict[str, list[tuple[nn.Module, str]]] = {}
        first: dict[int, str] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            canonical = first.setdefault(id(param), name)
            owner, _, attr = name.rpartition(".")
            self._slots.setdefault(canonical, []).append((model.get_submodule(owner), attr))
        persistent = set(model.state_dict(keep_vars=True))
        self._buffers = [n for n, _ in model.named_buffers() if n in persistent]
        self.names = list(self._slots) + self._buffers
        self.key, self.out_name = self._name_maps()
        missing = [n for n in self._slots if n not in self.key]
        if missing:
            raise UserError(
                f"{self.folder}: no tensor for {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} "
                "in the checkpoint; streaming needs its names to match the model's (use --offload none)"
            )
        self._head = self._head_only_names()

    def _name_maps(self) -> tuple[dict[str, str], dict[str, str]]:
        """Model name → checkpoint name (as ``from_pretrained`` renames keys on loading), and model
        name → output name (as ``save_pretrained`` renames them back, e.g. GPT-NeoX's ``embed_out``)."""
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            rename_source_key,
            revert_weight_conversion,
        )

        model = self.model
        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        meta = model.state_dict(keep_vars=True)
        key: dict[str, str] = {}
        for stored in self.checkpoint.weight_map:
            name, converter = rename_source_key(stored, renamings, converters, model.base_model_prefix, meta)
            if name not in meta and stored in meta:
                name, converter = stored, None
            if name not in meta:
                continue  # e.g. a stored rotary table the model computes itself
            if converter is not None:
                raise UserError(
                    f"{self.folder}: {stored} is converted on loading (fused or split tensors); streaming "
                    "reads tensors one to one: use --offload none"
                )
            key[name] = stored
        placeholders = {n: torch.empty(tuple(self.tensor(n).shape), device="meta") for n in self.names}
        by_id = {id(t): name for name, t in revert_weight_conversion(model, dict(placeholders)).items()}
        out_name = {n: by_id.get(id(t), n) for n, t in placeholders.items()}
        return key, out_name

    def _head_only_names(self) -> set[str]:
        """Parameters that only the output head uses (an untied lm_head): never needed to prune."""
        head = self.model.get_output_embeddings()
        if head is None:
            return set()
        return {name for name, slots in self._slots.items() if all(module is head for module, _ in slots)}

    # ---------------------------------------------------------------------------------------------
    def layer_prefix(self, index: int) -> str:
        return f"{self.stack.path}.{index}."

    def names_under(self, prefix: str) -> list[str]:
        return [n for n in self.names if n.startswith(prefix)]

    def outside_names(self, head: bool = False) -> list[str]:
        """Tensors outside the decoder stack (without the head-only ones unless ``head``)."""
        stack = self.stack.path + "."
        return [n for n in self.names if not n.startswith(stack) and (head or n not in self._head)]

    def load(self, names: list[str], device: torch.device | str, source: Checkpoint | None = None) -> None:
        """Read tensors ``names`` from ``source`` (default: the input checkpoint) into the model.


        A persistent buffer absent from the checkpoint keeps the value the model computed.
        """
        source = source or self.checkpoint
        keys = {n: (self.key.get(n) if source is self.checkpoint else self.out_name[n]) for n in names}
        present = [n for n in names if keys[n] is not None and keys[n] in source]
        absent = [n for n in names if n in self._slots and n not in present]
        if absent:
            raise RuntimeError(f"{source.folder} has no tensor {absent[0]}")
        tensors = source.read([keys[n] for n in present], self.dtype, device)
        for name in present:
            tensor = tensors.pop(keys[name])
            # Checked as it is read: the eval and attention walks stream layers too.
            check_weight(f"{keys[name]} (in {source.folder})", tensor)
            self._set(name, tensor)

    def release(self, names: list[str]) -> None:
        """Free parameters ``names`` (back to the meta device); buffers are small and stay."""
        for name in names:
            if name in self._slots:
                module, attr = self._slots[name][0]
                p = getattr(module, attr)
                self._set(name, torch.empty(p.shape, dtype=p.dtype, device="meta"))

    def _set(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._slots:
            param = nn.Parameter(tensor, requires_grad=False)
            for module, attr in self._slots[name]:
                module._parameters[attr] = param
        else:
            owner, _, attr = name.rpartition(".")
            self.model.get_submodule(owner)._buffers[attr] = tensor

    def tensor(self, name: str) -> torch.Tensor:
        if name in self._slots:
            module, attr = self._slots[name][0]
            return getattr(module, attr).data
        return self.model.get_buffer(name)

    def materialized(self) -> list[str]:
        """Names of the parameters that currently hold data (not on the meta device)."""
        return [n for n in self._slots if not self.tensor(n).is_meta]

    @contextmanager
    def loaded(self, names: list[str], device: torch.device | str) -> Iterator[None]:
        self.load(names, device)
        try:
            yield
        finally:
            self.release(names)

    def stored_bytes(self, name: str) -> int:
        """Bytes of tensor ``name`` as written to the output (floating point in the model dtype)."""
        key = self.key.get(name)
        if key is None:
            t = self.tensor(name)
            return t.numel() * t.dtype.itemsize
        stored, shape = self.checkpoint.info(key)
        itemsize = self.dtype.itemsize if stored.is_floating_point else stored.itemsize
        return int(torch.Size(shape).numel()) * itemsize


class StreamingLayers(LayerStore):
    """Layers read from the checkpoint for their turn and freed after it (nothing is written)."""

    def __init__(self, streamed: StreamedModel):
        super().__init__()
        self.streamed = streamed

    @contextmanager
    def outside_stack(self, device: torch.device) -> Iterator[None]:
        with self.streamed.loaded(self.streamed.outside_names(), device):
            yield

    def fetch(self, index: int, layer: nn.Module, device: torch.device, pruned: bool = False) -> None:
        self.streamed.load(self.streamed.names_under(self.streamed.layer_prefix(index)), device)

    def release(self, index: int, layer: nn.Module, save: bool) -> None:
        self.streamed.release(self.streamed.names_under(self.streamed.layer_prefix(index)))
