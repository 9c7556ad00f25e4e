"""Loading d2prune model folders, sparse (``io.sparse``) or dense, into plain transformers models."""

from __future__ import annotations

import os
from pathlib import Path

from d2prune.errors import UserError
from d2prune.io.sparse import SPARSE_INDEX, is_sparse_folder, read_state_dict


def load_sparse(folder: str | Path, dtype: str | None = None, tokenizer: bool = True):
    """``(model, tokenizer)`` from a sparse folder: ``from_pretrained`` with the decoded state dict,
    in ``dtype`` (default: the stored one). The tokenizer is None when ``tokenizer`` is False."""
    from concurrent.futures import ThreadPoolExecutor

    import torch
    import transformers
    from transformers import AutoConfig, GenerationConfig

    from d2prune.io.folders import load_processor, model_class, torch_dtype

    folder = Path(folder).expanduser()
    try:
        config = AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"could not read the config of {folder}: {exc}") from None
    # The weights decode (numpy and torch release the GIL) while the tokenizer loads: ~0.4 s of a
    # SmolLM2 load is its tokenizer.
    with ThreadPoolExecutor(max_workers=1) as background:
        decoding = background.submit(read_state_dict, folder)
        try:
            processor = load_processor(folder) if tokenizer else None
        finally:
            state = decoding.result()  # its error first: a damaged weights file is the likelier cause
    if dtype is None:  # as dtype="auto" would: the config's dtype, else the stored one
        stored = [t.dtype for t in state.values() if t.is_floating_point()]
        torch_type = getattr(config, "dtype", None)
        if not isinstance(torch_type, torch.dtype):
            torch_type = stored[0] if stored else torch.float32
    else:
        torch_type = torch_dtype(dtype)
    # The concrete class the auto class (causal LM or image classifier) would pick: it needs a path, not a state dict.
    cls, auto = (
        model_class(config),
        {
            transformers.AutoModelForCausalLM: transformers.MODEL_FOR_CAUSAL_LM_MAPPING,
            transformers.AutoModelForImageClassification: transformers.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING,
        },
    )
    try:
        cls = auto[cls][type(config)] if cls in auto else cls
    except KeyError:
        raise UserError(f"{folder}: transformers has no model class for {type(config).__name__}") from None
    model = _assigned(cls, config, state, torch_type)
    if model is None:  # what the quick build does not cover: transformers maps the keys, casts and ties
        model, info = cls.from_pretrained(
            None, config=config, state_dict=state, dtype=torch_type, output_loading_info=True
        )
        bad = {
            k: sorted(v)[:3]
            for k, v in info.items()
            if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v
        }
        if bad:
            raise UserError(f"{folder}: the sparse weights do not fit the model in config.json ({bad})")
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(folder))
    model.eval()
    return model, processor


def _assigned(cls, config, state: dict, dtype):
    """The model with the decoded tensors themselves as its weights (no copy, no initialisation), or
    None when the state dict is not exactly the model's own: keys transformers renames or converts
    on load, modules it keeps in float32, a shape that differs. ``from_pretrained`` handles those."""
    from transformers.initialization import no_init_weights

    if getattr(cls, "_keep_in_fp32_modules", None) or getattr(cls, "_keep_in_fp32_modules_strict", None):
        return None
    with no_init_weights():
        model = cls._from_config(config, dtype=dtype)
    own = model.state_dict()
    if not set(state) <= set(own):
        return None
    for name, tensor in state.items():
        if tensor.shape != own[name].shape:
            return None
    cast = {k: v.to(own[k].dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(cast, strict=False, assign=True)
    model.tie_weights()
    # Every weight the state dict lacks must now be one of its tensors (a tied lm_head), never an
    # uninitialised one.
    weights = model.state_dict(keep_vars=True)
    loaded = {id(t) for k, t in weights.items() if k in state}
    if any(id(t) not in loaded for k, t in weights.items() if k not in state):
        return None
    return model


def load_pretrained(folder: str | os.PathLike, dtype: str | None = None, device: str = "cpu"):
    """A plain transformers model (causal LM or image classifier) from a d2prune folder, sparse or dense, in eval mode.

    A sparse folder loads bit-identical to the dense save it was packed from; ``dtype`` (float32,
    bfloat16, float16) defaults to the stored one."""
    from d2prune.io.folders import torch_dtype

    folder = Path(folder).expanduser()
    if is_sparse_folder(folder):
        model, _ = load_sparse(folder, dtype, tokenizer=False)
    elif (folder / "config.json").is_file():
        from transformers import AutoConfig

        from d2prune.io.folders import model_class

        kwargs = {"dtype": torch_dtype(dtype)} if dtype is not None else {"dtype": "auto"}
        model = model_class(AutoConfig.from_pretrained(str(folder))).from_pretrained(str(folder), **kwargs).eval()
    else:
        raise UserError(f"{folder} is not a model folder: no config.json or {SPARSE_INDEX}")
    return model.to(device)
