"""GPT-2-style ``Conv1D`` linears (weight stored transposed, (in, out)): found, pruned with the right
orientation by every method, N:M groups along the inputs, saved and reloaded, and through the CLI.

The orientation reference is the same GPT-2 with every Conv1D replaced by an ``nn.Linear`` holding
the transposed weight: it computes the same function, and every method must prune it the same way.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import transformers
import transformers.pytorch_utils

from conftest import DATA, QUICK_CLI, TINY, make_calibration_ids, needs_assets, tiny_gpt2
from d2prune import api
from d2prune.config import PruneConfig
from d2prune.engine.architecture import (
    as_out_in,
    as_stored,
    find_decoder_stack,
    find_linears,
    in_features,
    is_conv1d,
    is_linear,
    out_features,
    weight_matrix,
)
from d2prune.engine.channels import find_producers, permute_channels
from d2prune.errors import UserError
from d2prune.methods.base import method_config

VOCAB = 128
GPT2_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
# Every registered method, with the options GPT-2 needs: D²Prune's default no-update linear
# (self_attn.k_proj) is LLaMA's, here the fused q/k/v projection takes its place.
METHODS = [
    ("magnitude", {}),
    ("wanda", {}),
    ("sparsegpt", {}),
    ("d2prune", {"target_layers": ["attn.c_attn"]}),
    ("pruner-zero", {}),
    ("alps", {}),
    ("d2alps", {"target_layers": ["attn.c_attn"]}),
    ("ria", {"permute": True}),
    ("dsnot", {}),
]


def conv1d_as_linear(model: nn.Module) -> nn.Module:
    """Replace every Conv1D by an nn.Linear with weight Wᵀ and the same bias (same function)."""
    for name, module in list(model.named_modules()):
        if is_conv1d(module):
            lin = nn.Linear(module.nx, module.nf, dtype=module.weight.dtype)
            with torch.no_grad():
                lin.weight.copy_(module.weight.t())
                lin.bias.copy_(module.bias)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, lin)
    return model


def matrices(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every decoder linear's (out, in) weight, by full path."""
    stack = find_decoder_stack(model)
    return {
        f"{stack.path}.{i}.{name}": weight_matrix(lin).clone()
        for i, layer in enumerate(stack.layers)
        for name, lin in find_linears(layer).items()
    }


# ------------------------------------------------------------------------------------------ finding


def test_find_linears_finds_the_conv1d_of_every_block_and_not_lm_head():
    model = tiny_gpt2()
    stack = find_decoder_stack(model)
    assert stack.path == "transformer.h" and len(stack.layers) == 2
    for layer in stack.layers:
        linears = find_linears(layer)
        # Module-relative names: attn.c_proj and mlp.c_proj are told apart by their parent.
        assert tuple(linears) == GPT2_LINEARS
        assert all(is_conv1d(m) and not isinstance(m, nn.Linear) for m in linears.values())
    assert isinstance(model.lm_head, nn.Linear)
    paths = {f"{stack.path}.{i}.{n}" for i, layer in enumerate(stack.layers) for n in find_linears(layer)}
    assert len(paths) == 8 and not any("lm_head" in p for p in paths)


def test_weight_matrix_is_the_out_in_view_that_writes_through():
    c_fc = tiny_gpt2().transformer.h[0].mlp.c_fc  # Conv1D(nf=256, nx=64): weight (64, 256)
    assert tuple(c_fc.weight.shape) == (64, 256)
    assert (in_features(c_fc), out_features(c_fc)) == (64, 256)
    w = weight_matrix(c_fc)
    assert tuple(w.shape) == (256, 64) and w.data_ptr() == c_fc.weight.data_ptr()
    x = torch.randn(3, 64)
    assert torch.allclose(c_fc(x), x @ w.t() + c_fc.bias, atol=1e-6)  # (out, in): y = x Wᵀ + b
    w.copy_(torch.zeros(256, 64).index_fill_(0, torch.tensor([5]), 1.0))
    stored = c_fc.weight.detach()
    assert float(stored[:, 5].sum()) == 64 and float(stored.sum()) == 64  # output 5's column
    assert torch.equal(as_stored(c_fc, w), stored) and torch.equal(as_out_in(c_fc, stored), w)
    lin = nn.Linear(64, 256)
    assert weight_matrix(lin).data_ptr() == lin.weight.data_ptr() and (in_features(lin), out_features(lin)) == (64, 256)


def test_torch_conv1d_and_other_modules_are_not_linears():
    assert not is_linear(nn.Conv1d(4, 4, 1))  # a real convolution (3-D weight)
    assert not is_linear(nn.Embedding(4, 4))
    fake = nn.Module()
    fake.weight = nn.Parameter(torch.zeros(3, 5))
    assert not is_linear(fake)


class Conv1D(nn.Module):
    """A model's own copy of transformers' Conv1D (as remote code has): found by name and shape."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.nf, self.nx = original.nf, original.nx
        self.weight, self.bias = original.weight, original.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(*x.shape[:-1], self.nf)


def test_a_models_own_conv1d_copy_is_pruned_like_transformers_conv1d():
    copy = tiny_gpt2()
    for name, module in list(copy.named_modules()):
        if isinstance(module, transformers.pytorch_utils.Conv1D):
            parent, _, child = name.rpartition(".")
            setattr(copy.get_submodule(parent), child, Conv1D(module))
    assert {type(m) for m in find_linears(copy.transformer.h[0]).values()} == {Conv1D}
    original, ids = tiny_gpt2(), make_calibration_ids(vocab=VOCAB)
    config = PruneConfig(method="wanda", pattern="2:4", progress=False)
    api.prune(copy, ids, config)
    api.prune(original, ids, config)
    got, want = matrices(copy), matrices(original)
    assert all(torch.equal(got[k], want[k]) for k in want)


# ------------------------------------------------------------------------------------------ pruning


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("method,options", METHODS, ids=[m for m, _ in METHODS])
def test_every_method_prunes_every_conv1d_exactly(method, options, pattern):
    model = tiny_gpt2()
    config = PruneConfig(method=method_config(method, **options), sparsity=0.5, pattern=pattern, progress=False)
    report = api.prune(model, make_calibration_ids(vocab=VOCAB), config)
    weights = matrices(model)
    assert [r.name for r in report.linears] == list(weights) and len(weights) == 8
    for name, w in weights.items():
        assert int((w == 0).sum()) == w.numel() // 2, name
        if pattern == "2:4":
            # Groups of 4 consecutive inputs of one output: in stored (in, out) layout, 4 rows of a column.
            zeros = (w.reshape(w.shape[0], -1, 4) == 0).sum(-1)
            assert bool((zeros == 2).all()), name
    assert all(r.sparsity == 0.5 for r in report.linears)
    if pattern == "2:4":
        assert all(r.nm_violations == 0 for r in report.linears)


ORIENTATION_CASES = [
    ("sparsegpt", {}, "unstructured"),
    ("sparsegpt", {}, "2:4"),
    ("wanda", {}, "unstructured"),
    ("wanda", {}, "2:4"),
    ("pruner-zero", {}, "unstructured"),  # gradients taken w.r.t. the stored (in, out) weight
    ("ria", {"permute": True}, "2:4"),  # permutes mlp.c_fc's outputs with mlp.c_proj's inputs
    ("d2prune", {"target_layers": ["attn.c_attn"]}, "unstructured"),
    ("dsnot", {}, "2:4"),
]


@pytest.mark.parametrize("method,options,pattern", ORIENTATION_CASES)
def test_conv1d_is_pruned_like_the_linear_holding_its_transpose(method, options, pattern):
    conv, lin = tiny_gpt2(), conv1d_as_linear(tiny_gpt2())
    assert not any(is_conv1d(m) for m in lin.modules())
    ids = make_calibration_ids(vocab=VOCAB)
    config = PruneConfig(method=method_config(method, **options), sparsity=0.5, pattern=pattern, progress=False)
    dense = matrices(conv)
    api.prune(conv, ids, config)
    api.prune(lin, ids, config)
    got, want = matrices(conv), matrices(lin)
    assert got.keys() == want.keys()
    for name in got:
        # Same inputs, same (out, in) weights: the methods see identical tensors. The forwards differ
        # only in how the matmul is called (addmm with W vs linear with Wᵀ), bit-identical on the
        # test CPU; the tolerance allows last-bit differences elsewhere, far below any change of mask.
        assert torch.equal(got[name] == 0, want[name] == 0), name
        assert torch.allclose(got[name], want[name], rtol=1e-5, atol=1e-6), name
        assert not torch.equal(got[name], dense[name])


@pytest.mark.parametrize("layerwise", [False, True])
def test_pruner_zero_gradients_are_out_in_like_the_weight_matrix(layerwise):
    from d2prune.methods.gradients import gradient_norms

    model, ids = tiny_gpt2(), make_calibration_ids(windows=3, vocab=VOCAB)
    norms = gradient_norms(model, ids, progress=False, layerwise=layerwise)
    # Brute force: each window's loss gradient w.r.t. the stored (in, out) weight, squared, summed.
    block = model.transformer.h[1]
    for name in ("attn.c_attn", "attn.c_proj"):  # c_proj is square: only the values tell the layouts apart
        weight = block.get_submodule(name).weight
        total = torch.zeros_like(weight)
        for k in range(ids.shape[0]):
            with torch.enable_grad():
                grad = torch.autograd.grad(model(ids[k : k + 1], labels=ids[k : k + 1]).loss, weight)[0]
            total += (100.0 * grad) ** 2
        got = norms[f"transformer.h.1.{name}"]
        assert got.shape == weight_matrix(block.get_submodule(name)).shape
        torch.testing.assert_close(got, total.sqrt().t(), rtol=1e-4, atol=1e-6)


def test_gpt2_mlp_channels_are_permuted_exactly():
    model = tiny_gpt2()
    block = model.transformer.h[0]
    linears = find_linears(block)
    producers = find_producers(block, linears, list(GPT2_LINEARS))
    assert producers == {"mlp.c_proj": ["mlp.c_fc"]}  # not attn.c_proj (attention mixes channels)
    x = torch.randn(2, 5, 64)
    before = block.mlp(x)
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(0))
    old_fc, old_proj = weight_matrix(linears["mlp.c_fc"]).clone(), weight_matrix(linears["mlp.c_proj"]).clone()
    permute_channels(linears["mlp.c_proj"], [linears["mlp.c_fc"]], perm)
    assert torch.equal(weight_matrix(linears["mlp.c_fc"]), old_fc[perm])
    assert torch.equal(weight_matrix(linears["mlp.c_proj"]), old_proj[:, perm])
    assert torch.allclose(block.mlp(x), before, atol=1e-5)


def test_d2prune_default_target_layers_name_llama_linears_clearly():
    config = PruneConfig(method=method_config("d2prune"), sparsity=0.5, progress=False)
    with pytest.raises(UserError, match="its linears are: attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj"):
        api.prune(tiny_gpt2(), make_calibration_ids(vocab=VOCAB), config)


def test_target_layers_auto_chooses_between_the_fused_qkv_and_none():
    from d2prune.methods.d2prune import D2PruneConfig
    from d2prune.selection import choose_on_heldout

    model, heldout = tiny_gpt2(), make_calibration_ids(windows=3, seed=99, vocab=VOCAB)
    config = PruneConfig(method=D2PruneConfig(target_layers="auto"), sparsity=0.5, progress=False)
    _, record = choose_on_heldout(model, make_calibration_ids(vocab=VOCAB), heldout, config)
    scores = record["heldout_ppl"]
    assert set(scores) == {"attn.c_attn", "none"} and record["chosen"] == min(scores, key=scores.get)
    assert all(int((w == 0).sum()) == w.numel() // 2 for w in matrices(model).values())


def test_nm_width_check_reads_the_conv1d_input_width():
    # n_inner = 130 (not a multiple of 4): mlp.c_fc writes 130 outputs, mlp.c_proj reads 130 inputs.
    # Only mlp.c_proj breaks 2:4; reading the stored (in, out) shape as (out, in) would blame c_fc.
    config = transformers.GPT2Config(
        n_layer=1, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64, n_inner=130, bos_token_id=0, eos_token_id=2
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    prune = PruneConfig(method=method_config("magnitude"), pattern="2:4", progress=False)
    with pytest.raises(UserError, match="input width 130 of GPT2Block.mlp.c_proj"):
        api.prune(model, make_calibration_ids(vocab=VOCAB), prune)


# ------------------------------------------------------------------------------------- save / reload


def test_save_pruned_reloads_identical_weights_and_logits(tmp_path):
    from d2prune.io.models import save_pruned

    if not (TINY / "tokenizer.json").is_file():
        pytest.skip(f"{TINY} missing")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(TINY))
    model = tiny_gpt2(vocab=512)
    api.prune(model, make_calibration_ids(vocab=512), PruneConfig(method="sparsegpt", pattern="2:4", progress=False))
    ids = torch.tensor([[1, 5, 17, 42, 99, 3, 64, 120]])
    with torch.no_grad():
        before = model(ids).logits
    out = save_pruned(model, tokenizer, tmp_path / "out", {"method": "sparsegpt"})
    again = transformers.GPT2LMHeadModel.from_pretrained(str(out)).eval()
    for name, tensor in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name
    with torch.no_grad():
        assert torch.equal(again(ids).logits, before)
    assert all(int((w == 0).sum()) == w.numel() // 2 for w in matrices(again).values())


@needs_assets
def test_cli_prunes_and_evaluates_a_gpt2_folder(tmp_path, cli_cache):
    from d2prune.cli import main

    folder = tmp_path / "gpt2"
    tiny_gpt2(vocab=512).save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(str(TINY)).save_pretrained(folder)
    out = tmp_path / "out"
    args = ["prune", str(folder), "--method", "wanda", "--pattern", "2:4", "--save-model", "--output-dir", str(out)]
    assert main([*args, *QUICK_CLI]) == 0
    record = json.loads((out / "run.json").read_text())
    assert [lin["name"] for lin in record["linears"]] == [
        f"transformer.h.{i}.{n}" for i in (0, 1) for n in GPT2_LINEARS
    ]
    assert all(lin["sparsity"] == 0.5 and lin["nm_violations"] == 0 for lin in record["linears"])
    pruned = record["perplexity"]["pruned"]["wikitext2"]["ppl"]

    reloaded = transformers.GPT2LMHeadModel.from_pretrained(str(out / "model"))
    for w in matrices(reloaded).values():
        assert bool(((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) == 2).all())
    ev = tmp_path / "ev"
    eval_args = ["eval", str(out / "model"), "--seqlen", "64", "--eval-windows", "4", "--no-progress"]
    assert main([*eval_args, "--data-dir", str(DATA), "--output-dir", str(ev)]) == 0
    again = json.loads((ev / "run.json").read_text())["perplexity"]["model"]["wikitext2"]["ppl"]
    assert again == pytest.approx(pruned, rel=1e-5)


def test_streamed_prune_of_a_gpt2_folder_matches_the_in_memory_prune(tmp_path):
    from d2prune.streaming import prune_checkpoint

    tiny_gpt2().save_pretrained(tmp_path / "src")
    ids = make_calibration_ids(vocab=VOCAB)
    config = PruneConfig(method="sparsegpt", pattern="2:4", progress=False)
    _, target = prune_checkpoint(tmp_path / "src", ids, config, tmp_path / "out")
    in_memory = tiny_gpt2()
    api.prune(in_memory, ids, config)
    streamed = transformers.GPT2LMHeadModel.from_pretrained(str(target)).state_dict()
    assert streamed.keys() == in_memory.state_dict().keys()
    for name, tensor in in_memory.state_dict().items():
        assert torch.equal(streamed[name], tensor), name
