"""Masked LoRA adapter folders: save one next to its pruned base, load one back, and teach
:func:`d2prune.io.models.load_model` to open one (the base model with the adapter merged exactly).

peft is imported only when an adapter is actually loaded, so importing this module (which registers
the folder loader) costs nothing and works without the ``finetune`` extra.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch.nn as nn

from d2prune.errors import UserError
from d2prune.io.models import load_model, register_folder_loader, save_model_folder

#: Marks a masked LoRA adapter folder; it names the pruned base model.
ADAPTER_FILE = "d2prune_adapter.json"


def save_adapter(peft_model, tokenizer, out_dir: str | Path, base_model: str, extra: dict | None = None) -> Path:
    """Save the masked adapter (peft format) with a marker naming the pruned base model; atomic."""
    marker = {
        "kind": "masked-lora",
        # An absolute path, so the folder still finds its base when read from elsewhere.
        "base_model": str(Path(base_model).resolve()) if Path(base_model).exists() else str(base_model),
        "mask": "M = (W != 0) of each adapted linear of the base model; effective weight W + M*(s*B@A)",
        "load_with": "d2prune.finetune.load_adapter(base_model, this_folder)",
        **(extra or {}),
    }
    return save_model_folder(peft_model, tokenizer, Path(out_dir), {ADAPTER_FILE: marker})


def load_adapter(model: nn.Module, adapter_dir: str | Path):
    """Load a masked adapter saved by :func:`save_adapter` onto ``model`` (the pruned base), eval mode.

    Plain ``PeftModel.from_pretrained`` would apply the dense update and un-prune the model; this
    rebuilds the mask from the base model's zeros.
    """
    from peft import LoraConfig, PeftModel

    from d2prune.finetune.masked_lora import quiet_peft, register_masked

    adapter_dir = Path(adapter_dir).expanduser()
    if not (adapter_dir / ADAPTER_FILE).is_file():
        raise UserError(f"{adapter_dir} is not a masked LoRA adapter folder (no {ADAPTER_FILE})")
    lora = LoraConfig.from_pretrained(str(adapter_dir))
    register_masked(lora)
    with quiet_peft():
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir), config=lora)
    peft_model.eval()
    return peft_model


def load_adapter_folder(path: Path, dtype: str, cache: bool):
    """``(model, tokenizer)`` of an adapter folder: its pruned base model with the adapter merged exactly.

    Registered with ``load_model``, which then moves the model to its device in eval mode.
    """
    try:
        base_name = json.loads((path / ADAPTER_FILE).read_text())["base_model"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path / ADAPTER_FILE} is not a valid adapter marker: {exc}") from None
    try:
        from d2prune.finetune.masked_lora import merge_masked_lora
    except ImportError as exc:
        raise UserError(f"loading the adapter {path} needs peft: pip install 'd2prune[finetune]' ({exc})") from None
    model, tokenizer = load_model(base_name, dtype=dtype, device="cpu", cache=cache)
    return merge_masked_lora(load_adapter(model, path)), tokenizer


register_folder_loader(ADAPTER_FILE, load_adapter_folder)
