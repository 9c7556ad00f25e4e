"""A module that stands in for decoder layers while the model's own forward runs.

The model's code before and after its decoder stack (embeddings, masks, rotary embeddings, final
norm, LM head, loss) is run as the model defines it, with some decoder layers replaced by a
``StandIn`` that records what reaches it, stops the forward pass, or hands on a given tensor instead
of computing the layer. ``standing_in`` swaps stand-ins into the stack and always puts the layers back.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn

from d2prune.engine.architecture import DecoderStack
from d2prune.errors import UserError


class StopForward(Exception):
    """Raised by a stand-in with ``stop`` once it has recorded its inputs: the rest of the forward
    pass is not needed."""


class StandIn(nn.Module):
    """Stands in for one decoder layer.

    Each call counts (``count``), is recorded as (hidden states, other positional args, keyword
    args) when ``record``, and then raises ``StopForward`` when ``stop``. Otherwise it returns
    ``inject`` when set (the same shape as the hidden states reaching it), else its input, bare or,
    with ``rest``, as the tuple (hidden, *rest) that layers of this model return.
    """

    def __init__(self, layer: nn.Module, *, record: bool = False, stop: bool = False, rest: tuple | None = None):
        super().__init__()
        self.layer = layer
        self.record = record
        self.stop = stop
        self.rest = rest
        self.inject: torch.Tensor | None = None
        self.count = 0
        self.calls: list[tuple[torch.Tensor, tuple, dict]] = []

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if args:
            hidden, positional = args[0], args[1:]
        else:
            hidden, positional = kwargs.pop("hidden_states"), ()
        self.count += 1
        if self.record:
            self.calls.append((hidden, positional, kwargs))
        if self.stop:
            raise StopForward
        if self.inject is not None:
            if hidden.shape != self.inject.shape:
                raise UserError(
                    f"{type(self.layer).__name__}: hidden states of shape {tuple(hidden.shape)} reach the decoder "
                    f"stack but layers return {tuple(self.inject.shape)}; this model cannot be run layer by layer"
                )
            hidden = self.inject
        return hidden if self.rest is None else (hidden, *self.rest)

    def __getattr__(self, name: str) -> Any:
        # Models read attributes of their layers (e.g. ``attention_type``): answer as the layer.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["layer"], name)


@contextmanager
def standing_in(
    stack: DecoderStack,
    indices: Iterable[int],
    *,
    record: bool = False,
    stop_at: int | None = None,
    rest: tuple | None = None,
) -> Iterator[list[StandIn]]:
    """Replace decoder layers ``indices`` by stand-ins (yielded in that order) and restore the
    layers afterwards, also when the body raises. ``stop_at``: the index whose stand-in stops the
    forward pass; ``record`` and ``rest`` as for ``StandIn``."""
    indices = list(indices)
    standins = [StandIn(stack.layers[i], record=record, stop=i == stop_at, rest=rest) for i in indices]
    try:
        for i, standin in zip(indices, standins):
            stack.layers[i] = standin
        yield standins
    finally:
        for i, standin in zip(indices, standins):
            stack.layers[i] = standin.layer
