"""The training loop of masked LoRA fine-tuning, and the sparsity bookkeeping around it."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from d2prune.engine.architecture import find_decoder_stack, find_linears
from d2prune.engine.precision import as_dtype, computing_in
from d2prune.errors import UserError
from d2prune.finetune.checkpoints import digest, latest_checkpoint, load_checkpoint, save_checkpoint, trainable_params
from d2prune.finetune.config import FinetuneConfig, FinetuneReport
from d2prune.finetune.masked_lora import add_masked_lora, masked_modules

log = logging.getLogger(__name__)


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
    if (
        not isinstance(train_ids, torch.Tensor)
        or train_ids.dim() != 2
        or train_ids.shape[0] < 1
        or train_ids.shape[1] < 2
    ):
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
    params = trainable_params(peft_model)
    key = {
        **config.trajectory_key(),
        "total_steps": total,
        "data": digest(train_ids),
        "base": digest(*(m.get_base_layer().weight for m in masked.values())),
    }
    optimizer = torch.optim.AdamW(list(params.values()), lr=config.lr, weight_decay=config.weight_decay)

    start, curve, tokens, resumed_from = 0, [], 0, None
    if resume:
        ckpt = latest_checkpoint(checkpoint_dir)  # type: ignore[arg-type]
        if ckpt is None:
            raise UserError(f"no checkpoint to resume from in {checkpoint_dir}")
        state = load_checkpoint(ckpt, params, optimizer, key)
        start, curve, tokens, resumed_from = state["step"], state["loss_curve"], state["tokens_seen"], str(ckpt)
        log.info("resuming from %s (step %d of %d)", ckpt, start, total)

    home = next(peft_model.parameters()).device
    peft_model.to(device)
    peft_model.train()
    last_ckpt, orders = None, {}
    t0 = time.perf_counter()
    try:
        with (
            # The frozen weights in the compute dtype; the trained adapters stay float32.
            computing_in(peft_model, as_dtype(config.compute_dtype, device), frozen_only=True),
            torch.random.fork_rng(devices=[] if device.type == "cpu" else None),
            tqdm(total=total, initial=start, desc="finetune", unit="step", disable=not config.progress) as bar,
        ):
            for step in range(start, total):
                epoch, k = divmod(step, steps_per_epoch)
                if epoch not in orders:
                    orders = {epoch: _epoch_order(n_blocks, config.seed, epoch)}
                group = orders[epoch][k * eff : (k + 1) * eff]
                torch.manual_seed(config.seed * 1_000_003 + step)  # dropout: a function of the step alone
                lr = _lr_at(step, total, config)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                optimizer.zero_grad(set_to_none=True)
                loss_sum = 0.0
                for i in range(0, len(group), config.batch_size):
                    ids = train_ids[group[i : i + config.batch_size]].to(device)
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
                if (
                    checkpoint_dir is not None
                    and config.save_steps
                    and (done % config.save_steps == 0 or done == total)
                ):
                    last_ckpt = save_checkpoint(
                        checkpoint_dir,
                        done,
                        params,
                        optimizer,
                        {"key": key, "loss_curve": curve, "tokens_seen": tokens},
                    )
                if on_step is not None:
                    on_step(done, mean_loss)
    finally:
        peft_model.eval()
        peft_model.to(home)
    return FinetuneReport(
        model=peft_model,
        config=config.to_dict(),
        steps=total,
        start_step=start,
        steps_per_epoch=steps_per_epoch,
        epochs=total / steps_per_epoch,
        n_blocks=n_blocks,
        block_size=block_size,
        blocks_seen=tokens // block_size,
        tokens_seen=tokens,
        loss_curve=curve,
        masked_linears={n: zeros[n][0] / zeros[n][1] for n in masked if n in zeros},
        dense_targets=dense_targets,
        zeros=sum(z for z, _ in zeros.values()),
        weights=sum(n for _, n in zeros.values()),
        train_seconds=time.perf_counter() - t0,
        resumed_from=resumed_from,
        checkpoint=str(last_ckpt) if last_ckpt else None,
    )
