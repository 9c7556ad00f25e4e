"""Masked LoRA on GPT-2's Conv1D linears (weight stored (in, out)): the mask is the (out, in) one,
training and merging keep every pruned position zero, and merged and adapter models agree."""

import copy

import pytest
import torch
import torch.nn.functional as F
import transformers

import d2prune
from conftest import make_calibration_ids
from d2prune.engine.architecture import is_conv1d, weight_matrix
from d2prune.finetune import (
    FinetuneConfig,
    finetune,
    linear_zeros,
    load_adapter,
    masked_modules,
    merge_masked_lora,
    save_adapter,
)
from d2prune.patterns import nm_violations

pytest.importorskip("peft")

VOCAB = 128


def pruned_gpt2(pattern: str = "2:4") -> transformers.GPT2LMHeadModel:
    config = transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=0, eos_token_id=2
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    d2prune.prune(
        model, make_calibration_ids(), d2prune.PruneConfig(method="magnitude", pattern=pattern, progress=False)
    )
    return model


def quick_config(**overrides) -> FinetuneConfig:
    options = dict(
        lr=1e-2,
        max_steps=3,
        batch_size=2,
        effective_batch_size=4,
        warmup_steps=0,
        lora_dropout=0.0,
        lora_targets=["c_attn", "c_fc", "c_proj"],  # c_proj: both attn.c_proj and mlp.c_proj
        progress=False,
    )
    options.update(overrides)
    return FinetuneConfig(**options)


def test_merge_keeps_the_conv1d_zeros_and_matches_the_adapter_model():
    model = pruned_gpt2()
    dense = {n: weight_matrix(m).clone() for n, m in model.named_modules() if is_conv1d(m)}
    before = linear_zeros(model)
    report = finetune(model, make_calibration_ids(12, 32, seed=1), quick_config())
    masked = masked_modules(report.model)
    assert len(masked) == 2 * 4
    for name, layer in masked.items():
        # The mask is (out, in), the orientation of peft's B·A, not Conv1D's stored (in, out).
        assert torch.equal(layer.sparsity_mask, weight_matrix(layer.get_base_layer()) != 0), name
        assert tuple(layer.sparsity_mask.shape) == tuple(dense[name].shape)
    ids = make_calibration_ids(3, 24, seed=7)
    with torch.no_grad():
        adapter_logits = report.model(input_ids=ids).logits
    masks = {n: m.sparsity_mask.clone() for n, m in masked.items()}
    merged = merge_masked_lora(report.model)
    assert type(merged).__name__ == "GPT2LMHeadModel"
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapter_logits, rtol=0, atol=1e-5)
    assert linear_zeros(merged) == before
    for name, keep in masks.items():
        module = merged.get_submodule(name)
        assert is_conv1d(module)  # merged back in its own layout
        weight = weight_matrix(module)
        assert torch.equal(weight != 0, keep)
        assert nm_violations(weight, 2, 4) == 0
        assert (weight != dense[name])[keep].float().mean() > 0.5  # training moved the kept weights


def test_conv1d_training_forward_is_the_masked_update_along_out_in():
    report = finetune(pruned_gpt2("unstructured"), make_calibration_ids(12, 32, seed=1), quick_config(lora_dropout=0.3))
    layer = masked_modules(report.model)["transformer.h.0.mlp.c_fc"]
    layer.train()
    x = torch.randn(2, 5, 64)
    torch.manual_seed(3)
    out = layer(x)
    torch.manual_seed(3)
    delta = torch.where(layer.sparsity_mask, layer.lora_B["default"].weight @ layer.lora_A["default"].weight, 0.0)
    expected = layer.get_base_layer()(x) + F.linear(layer.lora_dropout["default"](x), delta * layer.scaling["default"])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_conv1d_adapter_reloads_onto_the_pruned_base(tmp_path):
    pruned = pruned_gpt2()
    report = finetune(copy.deepcopy(pruned), make_calibration_ids(12, 32, seed=1), quick_config(max_steps=2))
    save_adapter(report.model, None, tmp_path / "adapter", "some/base")
    ids = make_calibration_ids(2, 16, seed=9)
    with torch.no_grad():
        expected = report.model(input_ids=ids).logits
        loaded = load_adapter(copy.deepcopy(pruned), tmp_path / "adapter")
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=0, atol=0)


def test_a_models_own_conv1d_copy_is_a_clear_error_as_lora_target():
    class Conv1D(torch.nn.Module):  # pruned like transformers' Conv1D, but peft cannot adapt it
        def __init__(self, original):
            super().__init__()
            self.nf, self.nx, self.weight, self.bias = original.nf, original.nx, original.weight, original.bias

    model = pruned_gpt2()
    for block in model.transformer.h:
        block.mlp.c_fc = Conv1D(block.mlp.c_fc)
    with pytest.raises(d2prune.UserError, match="c_fc, which is not a linear layer"):
        finetune(model, make_calibration_ids(12, 32, seed=1), quick_config(lora_targets=["c_fc"]))
