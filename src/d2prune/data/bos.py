"""``--window-bos``: whether every token window starts with the tokenizer's BOS token.

The canonical protocol (SparseGPT / Wanda / D²Prune) tokenizes the text once and cuts windows out of
it, so a window starts wherever the cut falls, without BOS. Gemma-family models were trained with BOS
first and are far off without it (dense WikiText-2 perplexity 117.4 instead of 31.3 on 8 windows of
256 tokens). ``always`` *replaces* the first token of each window by BOS: the window keeps ``seqlen``
tokens and the scored targets (positions 1..seqlen-1) are the very tokens ``never`` scores, so the
perplexity counts the same tokens either way; only the context of the first prediction changes.
``auto`` is ``always`` for the Gemma families (``model_type`` containing ``gemma``) and ``never``
for every other model, so published LLaMA / OPT / Qwen / Mistral numbers stay comparable.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from d2prune.errors import UserError

WINDOW_BOS_CHOICES = ("auto", "always", "never")
#: ``auto`` puts BOS first for a model whose ``model_type`` (or its text config's) contains this:
#: gemma, gemma2, gemma3(_text), gemma3n(_text), gemma4(_text), gemma4_unified(_text), the assistants,
#: recurrent_gemma, vaultgemma, paligemma, shieldgemma2 in transformers 5.24, and later Gemma types.
BOS_FAMILY_MARK = "gemma"
DOC = "docs/data.md#window-bos"


@dataclass(frozen=True)
class WindowBos:
    """A resolved ``--window-bos``: what was asked, what it means for this model, why, and the BOS id."""

    requested: str
    resolved: str  # "always" or "never"
    reason: str
    model_type: str | None = None
    token_id: int | None = None

    def apply(self, windows: torch.Tensor) -> torch.Tensor:
        """``windows`` (n, seqlen) with BOS as the first token of each (a copy); as they are for ``never``."""
        if self.resolved == "never":
            return windows
        out = windows.clone()
        out[:, 0] = self.token_id
        return out

    def cache_key(self) -> dict:
        """What the token cache adds to its key: nothing for ``never`` (today's files stay valid)."""
        return {} if self.resolved == "never" else {"window_bos": {"first_token": self.token_id}}

    def to_dict(self) -> dict:
        """For run records."""
        return asdict(self)


NEVER = WindowBos("never", "never", "requested")


def model_types(model: Any) -> list[str]:
    """The ``model_type`` of a model, a config or a string, and of its text config if it has one."""
    if model is None:
        return []
    if isinstance(model, str):
        return [model]
    config = getattr(model, "config", model)
    types = [getattr(config, "model_type", None)]
    text = getattr(config, "text_config", None)
    if text is not None:
        types.append(getattr(text, "model_type", None))
    return [t for t in types if t]


def needs_bos(model: Any) -> bool:
    """Whether ``auto`` puts BOS first for ``model`` (a model, a config or a model_type string)."""
    return any(BOS_FAMILY_MARK in t.lower() for t in model_types(model))


def _bos_id(tokenizer: Any, model: Any, why: str) -> int:
    """The tokenizer's BOS id; without a tokenizer, the model config's (the API's fallback)."""
    if tokenizer is not None:
        token_id = getattr(tokenizer, "bos_token_id", None)
        source = f"the tokenizer ({type(tokenizer).__name__})"
    else:
        config = getattr(model, "config", model)
        token_id = getattr(config, "bos_token_id", None)
        if token_id is None:  # a multimodal config keeps it in its text config
            token_id = getattr(getattr(config, "text_config", None), "bos_token_id", None)
        source = "the model config"
    if isinstance(token_id, (list, tuple)):
        token_id = token_id[0] if token_id else None
    if token_id is None:
        raise UserError(
            f"{why} puts the BOS token first in every window, but {source} has no BOS token; use --window-bos never"
        )
    return int(token_id)


def resolve_window_bos(choice: str | WindowBos = "never", model: Any = None, tokenizer: Any = None) -> WindowBos:
    """``choice`` ("auto", "always", "never", or an already resolved :class:`WindowBos`) for ``model``
    (a model, its config, a model_type string, or None) and ``tokenizer`` (whose BOS id is used; without
    one, the model config's ``bos_token_id``). ``auto`` needs the model."""
    if isinstance(choice, WindowBos):
        return choice
    if choice not in WINDOW_BOS_CHOICES:
        raise UserError(f"window_bos must be one of {', '.join(WINDOW_BOS_CHOICES)}, got {choice!r}")
    types = model_types(model)
    model_type = types[0] if types else None
    if choice == "never":
        return WindowBos("never", "never", "requested", model_type)
    if choice == "always":
        return WindowBos("always", "always", "requested", model_type, _bos_id(tokenizer, model, "--window-bos always"))
    if not types:
        raise UserError(
            "window_bos='auto' decides by the model's model_type: pass the model (or its config or "
            "model_type), or 'always' / 'never'"
        )
    if needs_bos(model):
        token_id = _bos_id(tokenizer, model, f"--window-bos auto (model_type {model_type})")
        reason = f"model_type {'/'.join(types)} is a Gemma-family model, trained with BOS first ({DOC})"
        return WindowBos("auto", "always", reason, model_type, token_id)
    reason = f"model_type {'/'.join(types)} keeps the canonical windows without BOS, as published numbers ({DOC})"
    return WindowBos("auto", "never", reason, model_type)
