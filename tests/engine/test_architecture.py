"""find_decoder_stack / find_linears on real transformers architectures (tiny random configs)."""

from __future__ import annotations

import pytest
import torch.nn as nn

from conftest import ARCH_KEYS, ARCHS, LAYERS, build_tiny_model
from d2prune import UserError
from d2prune.engine.architecture import find_decoder_stack, find_linears


@pytest.mark.parametrize("key", ARCH_KEYS)
def test_find_decoder_stack_finds_the_layer_list(key):
    model = build_tiny_model(key)
    stack = find_decoder_stack(model)
    arch = ARCHS[key]
    assert stack.path == arch.stack_path
    assert stack.layers is model.get_submodule(arch.stack_path)
    assert isinstance(stack.layers, nn.ModuleList)
    assert len(stack.layers) == model.config.num_hidden_layers == LAYERS
    assert stack.layer_class == type(model.get_submodule(f"{arch.stack_path}.0")).__name__


def test_find_decoder_stack_counts_layers_beyond_two():
    model = build_tiny_model("llama-gqa", num_hidden_layers=3)
    stack = find_decoder_stack(model)
    assert (stack.path, len(stack.layers)) == ("model.layers", 3)


@pytest.mark.parametrize("key", ARCH_KEYS)
def test_find_linears_lists_every_linear_of_a_layer(key):
    model = build_tiny_model(key)
    layer = find_decoder_stack(model).layers[0]
    linears = find_linears(layer)
    assert tuple(linears) == ARCHS[key].linears
    assert all(isinstance(lin, nn.Linear) for lin in linears.values())
    for name, lin in linears.items():
        assert lin is layer.get_submodule(name)


def test_find_linears_llama_names():
    layer = find_decoder_stack(build_tiny_model("llama-gqa")).layers[0]
    assert list(find_linears(layer)) == [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ]


def test_find_linears_opt_names():
    layer = find_decoder_stack(build_tiny_model("opt")).layers[0]
    assert sorted(find_linears(layer)) == sorted(
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"]
    )


def test_lm_head_and_embeddings_are_outside_the_stack():
    model = build_tiny_model("llama-gqa")
    stack = find_decoder_stack(model)
    inside = {id(m) for m in stack.layers.modules()}
    assert id(model.lm_head) not in inside
    assert id(model.get_input_embeddings()) not in inside


class _NoStack(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
        # A ModuleList without linears must not count as a decoder stack either.
        self.norms = nn.ModuleList([nn.LayerNorm(8), nn.LayerNorm(8)])

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize(
    "model, cls_name",
    [
        (nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), "Sequential"),
        (_NoStack(), "_NoStack"),
    ],
)
def test_model_without_decoder_stack_raises_user_error_naming_the_class(model, cls_name):
    with pytest.raises(UserError, match=cls_name):
        find_decoder_stack(model)


def test_mixed_class_module_list_is_not_a_stack():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(4, 4)), nn.Linear(4, 4)])

    with pytest.raises(UserError, match="Mixed"):
        find_decoder_stack(Mixed())


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)


class _TwoStacks(nn.Module):
    """An encoder-like stack of 2 and a decoder stack of 3 blocks: the larger one is the decoder."""

    def __init__(self):
        super().__init__()
        self.small = nn.ModuleList([_Block() for _ in range(2)])
        self.big = nn.ModuleList([_Block() for _ in range(3)])


def test_largest_stack_of_blocks_with_linears_wins():
    model = _TwoStacks()
    stack = find_decoder_stack(model)
    assert (stack.path, len(stack.layers), stack.layer_class) == ("big", 3, "_Block")
