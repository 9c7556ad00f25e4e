"""LoRA recovery fine-tuning that keeps the sparsity mask (spec §1.9 item 9; the paper's ``main_lora.py``).

A LoRA update s·BA is dense: merging it re-densifies a pruned linear, and masking it only after
training ships a model that training never saw. Here every adapted linear computes, in training and
in evaluation, with the effective weight

    W_eff = W + M ⊙ (s·B A),      M = (W ≠ 0),

which equals M ⊙ (W + s·BA) because W is already zero wherever M is. The model trained is therefore
exactly the merged model: merging writes the same W_eff (formed in float32, then cast) into the base
linear, so the zeros stay zeros and the sparsity after merging is the sparsity before, to the weight.

Built on ``peft`` (a masked subclass of its LoRA ``Linear``, registered through LoraConfig's custom
module hook) and a plain training loop rather than the transformers ``Trainer``. The loop is short,
and owning it is what makes a resumed run bit-identical to an uninterrupted one: the data order
comes from (seed, epoch), dropout is re-seeded from (seed, step), the learning rate is a function
of the step, so a checkpoint needs only the adapter, the AdamW state and the loss curve; it also
avoids the Trainer/accelerate layer, which does nothing for a single CPU or GPU.

    from d2prune.finetune import FinetuneConfig, finetune, merge_masked_lora
    report = finetune(model, train_ids, FinetuneConfig(max_steps=100, effective_batch_size=8))
    model = merge_masked_lora(report.model)      # plain transformers model, same zeros
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.tuners_utils import check_adapters_to_merge

from d2prune.engine.architecture import find_decoder_stack, find_linears
from d2prune.errors import UserError
from d2prune.io.models import ADAPTER_FILE as ADAPTER_MARKER

log = logging.getLogger(__name__)

_CKPT_PREFIX = "step-"


# --------------------------------------------------------------------------------------------------
# Config and report


@dataclass
class FinetuneConfig:
    """LoRA hyper-parameters and the training schedule. Defaults follow Wanda's recipe (spec §1.9.9).

    ``effective_batch_size`` blocks make one optimizer step (``batch_size`` per forward, the rest by
    gradient accumulation). ``max_steps`` (optimizer steps) overrides ``epochs``. The learning rate
    warms up linearly over ``warmup_steps``, then decays linearly towards 0 at the last step.
    """

    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    lr: float = 1e-4
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 1
    effective_batch_size: int = 128
    warmup_steps: int = 5
    weight_decay: float = 0.0
    save_steps: int | None = None
    seed: int = 0
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.lora_targets, str):
            self.lora_targets = [t for t in self.lora_targets.split(",") if t.strip()]
        self.lora_targets = [t.strip() for t in self.lora_targets]
        if not self.lora_targets:
            raise UserError("--lora-targets names no module")
        ints = {"lora_r": self.lora_r, "epochs": self.epochs, "batch_size": self.batch_size,
                "effective_batch_size": self.effective_batch_size}
        if self.max_steps is not None:
            ints["max_steps"] = self.max_steps
        if self.save_steps is not None:
            ints["save_steps"] = self.save_steps
        for name, value in ints.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"{name} must be a positive integer, got {value!r}")
        if self.effective_batch_size % self.batch_size:
            raise UserError(
                f"effective batch size {self.effective_batch_size} is not a multiple of batch size {self.batch_size}"
            )
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UserError(f"learning rate must be positive, got {self.lr}")
        if not 0 <= self.lora_dropout < 1:
            raise UserError(f"LoRA dropout must be in [0, 1), got {self.lora_dropout}")
        if not self.lora_alpha > 0:
            raise UserError(f"LoRA alpha must be positive, got {self.lora_alpha}")
        if self.warmup_steps < 0 or self.weight_decay < 0:
            raise UserError("warmup steps and weight decay must not be negative")

    @property
    def grad_accum(self) -> int:
        return self.effective_batch_size // self.batch_size

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "grad_accum": self.grad_accum}

    def trajectory_key(self) -> dict[str, Any]:
        """The fields that change the trained weights (what a resumed run must share)."""
        d = self.to_dict()
        for k in ("save_steps", "device", "progress"):
            d.pop(k)
        return d


@dataclass
class FinetuneReport:
    """What ``finetune`` did. ``model`` is the PeftModel with the masked adapters, not merged."""

    model: Any
    config: dict[str, Any]
    steps: int
    start_step: int
    steps_per_epoch: int
    epochs: float
    n_blocks: int
    block_size: int
    blocks_seen: int
    tokens_seen: int
    loss_curve: list[dict[str, float]]
    masked_linears: dict[str, float]
    dense_targets: list[str]
    zeros: int
    weights: int
    train_seconds: float
    resumed_from: str | None = None
    checkpoint: str | None = None

    @property
    def overall_sparsity(self) -> float:
        """Zeros over all decoder-stack linears before fine-tuning (as the prune report counts them)."""
        return self.zeros / max(self.weights, 1)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "model"}
        d["overall_sparsity"] = self.overall_sparsity
        return d


# --------------------------------------------------------------------------------------------------
# Masked LoRA layer


def _smallest_subnormal(dtype: torch.dtype) -> float:
    info = torch.finfo(dtype)
    return info.tiny * info.eps


class MaskedLoraLinear(LoraLinear):
    """peft's LoRA ``Linear`` with the effective weight W + M ⊙ (s·BA), M = (W ≠ 0) at construction.

    A linear with no zero weight gets no mask and behaves as plain LoRA. Merging writes exactly the
    weight the forward uses, and so does the eval-mode forward, so adapter and merged model agree.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(base_layer, adapter_name, *args, **kwargs)
        keep = self.get_base_layer().weight.detach() != 0
        self.register_buffer("sparsity_mask", None if bool(keep.all()) else keep, persistent=False)

    def masked_delta(self, adapter: str) -> torch.Tensor:
        """M ⊙ (s·B A) in the adapter's dtype (float32 unless the adapter was cast)."""
        delta = (self.lora_B[adapter].weight @ self.lora_A[adapter].weight) * self.scaling[adapter]
        if self.sparsity_mask is not None:
            # where, not a product: an inf/nan delta must not leak into a pruned position.
            delta = torch.where(self.sparsity_mask, delta, 0.0)
        return delta

    def merged_weight(self, adapter: str) -> torch.Tensor:
        """W + M ⊙ (s·BA), summed in float32 and cast to W's dtype; kept weights never become 0."""
        weight = self.get_base_layer().weight
        merged = (weight.float() + self.masked_delta(adapter).float()).to(weight.dtype)
        if self.sparsity_mask is not None:
            # A kept weight that lands exactly on 0 would change the mask (and the sparsity):
            # give it the smallest subnormal instead, a change far below rounding.
            hit = self.sparsity_mask & (merged == 0)
            if bool(hit.any()):
                merged = torch.where(hit, torch.full_like(merged, _smallest_subnormal(weight.dtype)), merged)
        return merged

    def get_delta_weight(self, adapter: str) -> torch.Tensor:  # used by peft's unmerge
        return self.masked_delta(adapter).to(self.get_base_layer().weight.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter not in self.lora_A:
                continue
            merged = self.merged_weight(adapter)
            if not torch.isfinite(merged).all():
                raise ValueError(f"non-finite weights after merging adapter {adapter!r}: the adapter diverged")
            self.get_base_layer().weight.data = merged
            self.merged_adapters.append(adapter)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapters = [a for a in self.active_adapters if a in self.lora_A]
        if self.disable_adapters or self.merged or not adapters:
            return super().forward(x, *args, **kwargs)  # the base linear alone (merged: already masked)
        if kwargs.get("adapter_names") is not None:
            raise NotImplementedError("mixed-adapter batches are not supported by masked LoRA")
        base = self.get_base_layer()
        if len(adapters) == 1 and (not self.training or isinstance(self.lora_dropout[adapters[0]], nn.Identity)):
            # No dropout: one matmul with the very weight merging will write.
            return F.linear(x, self.merged_weight(adapters[0]), base.bias)
        result = base(x)
        for adapter in adapters:  # LoRA dropout acts on the adapter's input only, as in peft
            delta = self.masked_delta(adapter)
            result = result + F.linear(self.lora_dropout[adapter](self._cast_input_dtype(x, delta.dtype)), delta)
        return result.to(x.dtype)

    def __repr__(self) -> str:
        return "masked_" + super().__repr__()


def _lora_config(config: FinetuneConfig):
    from peft import LoraConfig

    lora = LoraConfig(
        r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=list(config.lora_targets), bias="none", task_type="CAUSAL_LM",
    )
    _register_masked(lora)
    return lora


def _register_masked(lora_config) -> None:
    # peft's hook for custom LoRA layers: every targeted nn.Linear becomes a MaskedLoraLinear.
    lora_config._register_custom_module({nn.Linear: MaskedLoraLinear})


def _check_targets(model: nn.Module, targets: list[str]) -> None:
    """Each target must name at least one nn.Linear (as peft matches: the name or its last parts)."""
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    names = [n for n, _ in model.named_modules()]
    for t in targets:
        hits = [n for n in names if n == t or n.endswith("." + t)]
        if not hits:
            short = sorted({n.rsplit(".", 1)[-1] for n in linears})
            raise UserError(f"LoRA target {t!r} matches no module; the model's linears are named {', '.join(short)}")
        bad = [n for n in hits if n not in linears]
        if bad:
            raise UserError(f"LoRA target {t!r} matches {bad[0]}, which is not a linear layer (only linears are adapted)")


def masked_modules(model: nn.Module) -> dict[str, MaskedLoraLinear]:
    """The masked LoRA layers of a PeftModel, by their name in the base model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {n: m for n, m in base.named_modules() if isinstance(m, MaskedLoraLinear)}


def add_masked_lora(model: nn.Module, config: FinetuneConfig):
    """Wrap ``model`` (in place) with masked LoRA adapters; returns the PeftModel. Seeded by ``config.seed``."""
    from peft import get_peft_model

    _check_targets(model, config.lora_targets)
    with torch.random.fork_rng(devices=[]), _quiet_peft():
        torch.manual_seed(config.seed)  # A's random init
        return get_peft_model(model, _lora_config(config))


@contextlib.contextmanager
def _quiet_peft():
    # peft 0.21 still calls a transformers 5 method that warns of its own rename.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


# --------------------------------------------------------------------------------------------------
# Sparsity bookkeeping


def linear_zeros(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``{full name: (zeros, weights)}`` over the linears of the decoder stack (never lm_head)."""
    stack = find_decoder_stack(model)
    out = {}
    for i, layer in enumerate(stack.layers):
        for name, lin in find_linears(layer).items():
            w = lin.weight
            out[f"{stack.path}.{i}.{name}"] = (int((w == 0).sum()), w.numel())
    return out


def _check_record(zeros: dict[str, tuple[int, int]], targets: list[str], record: dict | None) -> None:
    """The adapted linears' zeros must be the ones ``sparsity.json`` describes (same fraction)."""
    if not record or not isinstance(record.get("linears"), dict):
        return
    for name in targets:
        if name in record["linears"] and name in zeros:
            z, n = zeros[name]
            expected = float(record["linears"][name])
            if abs(z / n - expected) > 0.5 / n:
                raise UserError(
                    f"{name} has {z / n:.6f} zeros but sparsity.json records {expected:.6f}: "
                    "the weights are not the pruned ones the record describes"
                )


# --------------------------------------------------------------------------------------------------
# Checkpoints


def _digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _latest_checkpoint(folder: Path) -> Path | None:
    done = [p for p in folder.glob(f"{_CKPT_PREFIX}*") if (p / "state.json").is_file()] if folder.is_dir() else []
    return max(done, key=lambda p: int(p.name[len(_CKPT_PREFIX):])) if done else None


def _save_checkpoint(folder: Path, step: int, params: dict[str, nn.Parameter], optimizer, state: dict) -> Path:
    """Write ``folder/step-N`` via a temp folder and rename; then drop the older checkpoints."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{_CKPT_PREFIX}{step:06d}"
    tmp = folder / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file({n: p.detach().cpu().contiguous() for n, p in params.items()}, str(tmp / "adapter.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        # state.json last: its presence marks a complete checkpoint.
        (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=1) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in folder.glob(f"{_CKPT_PREFIX}*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _load_checkpoint(path: Path, params: dict[str, nn.Parameter], optimizer, key: dict) -> dict:
    from safetensors.torch import load_file

    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot resume from {path}: its state.json is damaged ({exc})") from None
    if not isinstance(state, dict) or state.get("key") != key:
        theirs = (state.get("key") or {}) if isinstance(state, dict) else {}
        diff = sorted(k for k in set(key) | set(theirs) if key.get(k) != theirs.get(k))
        raise UserError(f"cannot resume from {path}: it was made by a different run (differs in {', '.join(diff)})")
    tensors = load_file(str(path / "adapter.safetensors"))
    if set(tensors) != set(params):
        raise UserError(f"cannot resume from {path}: its adapter tensors do not match this model's")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name])
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    return state


# --------------------------------------------------------------------------------------------------
# Training


def _lr_at(step: int, total: int, config: FinetuneConfig) -> float:
    """Linear warm-up over ``warmup_steps``, then linear decay; no step has a zero learning rate."""
    w = min(config.warmup_steps, total - 1)
    if step < w:
        return config.lr * (step + 1) / (w + 1)
    return config.lr * (total - step) / (total - w)


def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def finetune(
    model: nn.Module,
    train_ids: torch.Tensor,
    config: FinetuneConfig | None = None,
    *,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    sparsity_record: dict | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> FinetuneReport:
    """Train masked LoRA adapters on ``train_ids`` (LongTensor: blocks × tokens, causal-LM loss).

    ``model`` is wrapped in place (see ``add_masked_lora``) and the PeftModel is ``report.model``;
    call :func:`merge_masked_lora` for a plain model. With ``checkpoint_dir`` and
    ``config.save_steps``, a checkpoint is written every K optimizer steps and at the end;
    ``resume=True`` continues from the latest one there (the same data and settings are required).
    ``sparsity_record`` (a saved model's ``sparsity.json``) is checked against the weights' zeros.
    ``on_step(step, loss)`` is called after every optimizer step.
    """
    from tqdm.auto import tqdm

    config = config or FinetuneConfig()
    if not isinstance(train_ids, torch.Tensor) or train_ids.dim() != 2 or train_ids.shape[0] < 1 or train_ids.shape[1] < 2:
        raise UserError("training data must be a (blocks, tokens) tensor with at least one block of 2 tokens")
    if resume and checkpoint_dir is None:
        raise UserError("resuming needs the checkpoint folder (the output folder of the interrupted run)")
    train_ids = train_ids.long()
    n_blocks, block_size = train_ids.shape
    device = torch.device(config.device)
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None

    zeros = linear_zeros(model)
    peft_model = add_masked_lora(model, config)
    masked = masked_modules(peft_model)
    _check_record(zeros, list(masked), sparsity_record)
    dense_targets = [n for n, m in masked.items() if m.sparsity_mask is None]
    if len(dense_targets) == len(masked):
        log.warning("the adapted linears have no zero weights: this is plain LoRA on a dense model")

    eff = config.effective_batch_size
    steps_per_epoch = math.ceil(n_blocks / eff)
    total = config.max_steps or config.epochs * steps_per_epoch
    params = _trainable(peft_model)
    key = {**config.trajectory_key(), "total_steps": total,
           "data": _digest(train_ids), "base": _digest(*(m.get_base_layer().weight for m in masked.values()))}
    optimizer = torch.optim.AdamW(list(params.values()), lr=config.lr, weight_decay=config.weight_decay)

    start, curve, tokens, resumed_from = 0, [], 0, None
    if resume:
        ckpt = _latest_checkpoint(checkpoint_dir)  # type: ignore[arg-type]
        if ckpt is None:
            raise UserError(f"no checkpoint to resume from in {checkpoint_dir}")
        state = _load_checkpoint(ckpt, params, optimizer, key)
        start, curve, tokens, resumed_from = state["step"], state["loss_curve"], state["tokens_seen"], str(ckpt)
        log.info("resuming from %s (step %d of %d)", ckpt, start, total)

    home = next(peft_model.parameters()).device
    peft_model.to(device)
    peft_model.train()
    last_ckpt, orders = None, {}
    t0 = time.perf_counter()
    try:
        with torch.random.fork_rng(devices=[] if device.type == "cpu" else None), tqdm(
            total=total, initial=start, desc="finetune", unit="step", disable=not config.progress
        ) as bar:
            for step in range(start, total):
                epoch, k = divmod(step, steps_per_epoch)
                if epoch not in orders:
                    orders = {epoch: _epoch_order(n_blocks, config.seed, epoch)}
                group = orders[epoch][k * eff: (k + 1) * eff]
                torch.manual_seed(config.seed * 1_000_003 + step)  # dropout: a function of the step alone
                lr = _lr_at(step, total, config)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                optimizer.zero_grad(set_to_none=True)
                loss_sum = 0.0
                for i in range(0, len(group), config.batch_size):
                    ids = train_ids[group[i: i + config.batch_size]].to(device)
                    loss = peft_model(input_ids=ids, labels=ids, use_cache=False).loss
                    # Blocks have equal length, so weighting by block count gives the group's mean loss.
                    (loss * (len(ids) / len(group))).backward()
                    loss_sum += float(loss.detach()) * len(ids)
                optimizer.step()
                mean_loss = loss_sum / len(group)
                if not math.isfinite(mean_loss):
                    raise UserError(f"the training loss became {mean_loss} at step {step + 1}; lower the learning rate")
                tokens += len(group) * block_size
                curve.append({"step": step + 1, "loss": mean_loss, "lr": lr})
                bar.update(1)
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")
                done = step + 1
                if checkpoint_dir is not None and config.save_steps and (done % config.save_steps == 0 or done == total):
                    last_ckpt = _save_checkpoint(checkpoint_dir, done, params, optimizer,
                                                 {"key": key, "loss_curve": curve, "tokens_seen": tokens})
                if on_step is not None:
                    on_step(done, mean_loss)
    finally:
        peft_model.eval()
        peft_model.to(home)
    return FinetuneReport(
        model=peft_model, config=config.to_dict(), steps=total, start_step=start, steps_per_epoch=steps_per_epoch,
        epochs=total / steps_per_epoch, n_blocks=n_blocks, block_size=block_size, blocks_seen=tokens // block_size,
        tokens_seen=tokens, loss_curve=curve,
        masked_linears={n: zeros[n][0] / zeros[n][1] for n in masked if n in zeros},
        dense_targets=dense_targets, zeros=sum(z for z, _ in zeros.values()), weights=sum(n for _, n in zeros.values()),
        train_seconds=time.perf_counter() - t0, resumed_from=resumed_from,
        checkpoint=str(last_ckpt) if last_ckpt else None,
    )


# --------------------------------------------------------------------------------------------------
# Merge, save, load


def merge_masked_lora(peft_model) -> nn.Module:
    """Merge the masked adapters exactly into the base linears; returns the plain transformers model.

    Raises RuntimeError if a pruned position is not zero afterwards (that would be a bug here).
    """
    masks = {n: m.sparsity_mask.clone() for n, m in masked_modules(peft_model).items() if m.sparsity_mask is not None}
    model = peft_model.merge_and_unload()
    for name, keep in masks.items():
        weight = model.get_submodule(name).weight
        if not torch.equal(weight != 0, keep.to(weight.device)):
            raise RuntimeError(f"merging changed the zero pattern of {name}")
    return model


def save_adapter(peft_model, tokenizer, out_dir: str | Path, base_model: str, extra: dict | None = None) -> Path:
    """Save the masked adapter (peft format) with a marker naming the pruned base model; atomic."""
    from d2prune.io.models import _save_folder_atomic  # the same temp-folder-and-rename as a saved model

    marker = {
        "kind": "masked-lora",
        # An absolute path, so the folder still finds its base when read from elsewhere.
        "base_model": str(Path(base_model).resolve()) if Path(base_model).exists() else str(base_model),
        "mask": "M = (W != 0) of each adapted linear of the base model; effective weight W + M*(s*B@A)",
        "load_with": "d2prune.finetune.load_adapter(base_model, this_folder)",
        **(extra or {}),
    }
    return _save_folder_atomic(peft_model, tokenizer, Path(out_dir), {ADAPTER_MARKER: marker})


def load_adapter(model: nn.Module, adapter_dir: str | Path):
    """Load a masked adapter saved by :func:`save_adapter` onto ``model`` (the pruned base), eval mode.

    Plain ``PeftModel.from_pretrained`` would apply the dense update and un-prune the model; this
    rebuilds the mask from the base model's zeros.
    """
    from peft import LoraConfig, PeftModel

    adapter_dir = Path(adapter_dir).expanduser()
    if not (adapter_dir / ADAPTER_MARKER).is_file():
        raise UserError(f"{adapter_dir} is not a masked LoRA adapter folder (no {ADAPTER_MARKER})")
    lora = LoraConfig.from_pretrained(str(adapter_dir))
    _register_masked(lora)
    with _quiet_peft():
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir), config=lora)
    peft_model.eval()
    return peft_model


def plot_loss(curve: list[dict[str, float]], path: str | Path, title: str = "LoRA fine-tuning") -> Path | None:
    """Training loss per optimizer step as a PNG (None, with a warning, when matplotlib is missing)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        log.warning("matplotlib is not installed: no loss plot (pip install 'd2prune[plot]')")
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(7, 4), constrained_layout=True)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot([c["step"] for c in curve], [c["loss"] for c in curve], "-", marker="o" if len(curve) < 50 else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (mean CE per token)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, path)
    return path
