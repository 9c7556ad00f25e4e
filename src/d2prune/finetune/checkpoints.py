"""Fine-tuning checkpoints: the adapter, the AdamW state and the loss curve every K steps, for an exact resume."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from pathlib import Path

import torch
import torch.nn as nn

from d2prune.errors import UserError
from d2prune.io.atomic import atomic_folder

_CKPT_PREFIX = "step-"


def digest(*tensors: torch.Tensor) -> str:
    """sha256 over the bytes of ``tensors``: what a resumed run must share (data, base weights)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def trainable_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters training updates (the LoRA A and B matrices), by name."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def latest_checkpoint(folder: Path) -> Path | None:
    """The complete checkpoint (one with state.json) of the highest step in ``folder``, or None."""
    done = [p for p in folder.glob(f"{_CKPT_PREFIX}*") if (p / "state.json").is_file()] if folder.is_dir() else []
    return max(done, key=lambda p: int(p.name[len(_CKPT_PREFIX) :])) if done else None


def save_checkpoint(folder: Path, step: int, params: dict[str, nn.Parameter], optimizer, state: dict) -> Path:
    """Write ``folder/step-N`` atomically (temp folder, fsync, rename); then drop the older checkpoints."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{_CKPT_PREFIX}{step:06d}"
    with atomic_folder(final) as tmp:
        save_file({n: p.detach().cpu().contiguous() for n, p in params.items()}, str(tmp / "adapter.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        # state.json last: its presence marks a complete checkpoint.
        (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=1) + "\n")
    for old in folder.glob(f"{_CKPT_PREFIX}*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, params: dict[str, nn.Parameter], optimizer, key: dict) -> dict:
    """Restore ``params`` and ``optimizer`` from ``path``; returns its state (step, loss curve, tokens seen)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot resume from {path}: its state.json is damaged ({exc})") from None
    if not isinstance(state, dict) or state.get("key") != key:
        theirs = (state.get("key") or {}) if isinstance(state, dict) else {}
        diff = sorted(k for k in set(key) | set(theirs) if key.get(k) != theirs.get(k))
        raise UserError(f"cannot resume from {path}: it was made by a different run (differs in {', '.join(diff)})")
    # A checkpoint whose files were damaged after state.json marked it complete (a disk that filled
    # up, a copy cut short) is named, not a traceback from the readers.
    try:
        tensors = load_file(str(path / "adapter.safetensors"))
    except (OSError, SafetensorError) as exc:
        raise UserError(f"cannot resume from {path}: its adapter.safetensors is damaged ({exc})") from None
    if set(tensors) != set(params) or any(tensors[n].shape != p.shape for n, p in params.items()):
        raise UserError(f"cannot resume from {path}: its adapter tensors do not match this model's")
    try:
        optimizer_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        optimizer.load_state_dict(optimizer_state)
    except (OSError, RuntimeError, EOFError, ValueError, KeyError, pickle.UnpicklingError) as exc:
        raise UserError(f"cannot resume from {path}: its optimizer.pt is damaged ({exc})") from None
    if not all(k in state for k in ("step", "loss_curve", "tokens_seen")):
        raise UserError(f"cannot resume from {path}: its state.json lacks the step, loss curve or tokens seen")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name])
    return state
