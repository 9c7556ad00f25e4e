"""Shared fixtures: tiny seeded random causal LMs of several architectures and calibration ids.

Every model is float32, in eval mode, with 2 decoder layers, hidden size 64 and a 128-token vocab,
so a whole prune runs in well under a second on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

VOCAB = 128
HIDDEN = 64
INTERMEDIATE = 128
LAYERS = 2
HEADS = 4
MAX_POSITIONS = 64

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
# The tiny trained LLaMA and the data folder of ../shared, for CLI runs on real files.
TINY = SHARED / "models" / "aidreams260K"
DATA = SHARED / "data"
QUICK_CLI = ["--nsamples", "4", "--seqlen", "64", "--eval-windows", "4", "--no-progress", "--data-dir", str(DATA)]
needs_assets = pytest.mark.skipif(not (TINY.exists() and DATA.exists()), reason="shared assets missing")

# Tests marked ``cuda`` compare a CUDA run with the CPU result; without a GPU they are skipped
# (``pytest -m cuda``, as scripts/gpu_check.sh runs them, selects only them).
CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


# The test tensors are tiny: one intra-op thread is as fast as two, and it keeps OpenMP workers from
# spin-waiting (tens of times slower) when the 2-core machine is busy with something else.
torch.set_num_threads(1)


@dataclass(frozen=True)
class Arch:
    """What the tests need to know about one architecture."""

    key: str
    model_class: str
    config_class: str
    stack_path: str  # path of the decoder-layer ModuleList
    linears: tuple[str, ...]  # module-relative linear names of one decoder layer, in module order
    input_norm: str  # module-relative name of the norm in front of ``first_linear``
    first_linear: str  # a linear that reads ``input_norm``'s output
    d2_target: str  # a linear name for D2PruneConfig.target_layers (no-update branch)
    options: dict = field(default_factory=dict)


_LLAMA_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
_GQA = {"num_attention_heads": HEADS, "num_key_value_heads": 2}

ARCHS: dict[str, Arch] = {
    a.key: a
    for a in [
        Arch(
            "llama-gqa",
            "LlamaForCausalLM",
            "LlamaConfig",
            "model.layers",
            _LLAMA_LINEARS,
            "input_layernorm",
            "self_attn.q_proj",
            "self_attn.k_proj",
            dict(_GQA),
        ),
        Arch(
            "qwen2",
            "Qwen2ForCausalLM",
            "Qwen2Config",
            "model.layers",
            _LLAMA_LINEARS,
            "input_layernorm",
            "self_attn.q_proj",
            "self_attn.k_proj",
            dict(_GQA),
        ),
        Arch(
            "qwen3",
            "Qwen3ForCausalLM",
            "Qwen3Config",
            "model.layers",
            _LLAMA_LINEARS,
            "input_layernorm",
            "self_attn.q_proj",
            "self_attn.k_proj",
            {**_GQA, "head_dim": HIDDEN // HEADS},
        ),
        Arch(
            "mistral",
            "MistralForCausalLM",
            "MistralConfig",
            "model.layers",
            _LLAMA_LINEARS,
            "input_layernorm",
            "self_attn.q_proj",
            "self_attn.k_proj",
            dict(_GQA),
        ),
        Arch(
            "opt",
            "OPTForCausalLM",
            "OPTConfig",
            "model.decoder.layers",
            ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj", "fc1", "fc2"),
            "self_attn_layer_norm",
            "self_attn.q_proj",
            "self_attn.k_proj",
            {"num_attention_heads": HEADS, "ffn_dim": INTERMEDIATE, "word_embed_proj_dim": HIDDEN},
        ),
        Arch(
            "gpt-neox",
            "GPTNeoXForCausalLM",
            "GPTNeoXConfig",
            "gpt_neox.layers",
            ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
            "input_layernorm",
            "attention.query_key_value",
            "attention.query_key_value",
            {"num_attention_heads": HEADS},
        ),
        Arch(
            "phi3",
            "Phi3ForCausalLM",
            "Phi3Config",
            "model.layers",
            ("self_attn.o_proj", "self_attn.qkv_proj", "mlp.gate_up_proj", "mlp.down_proj"),
            "input_layernorm",
            "self_attn.qkv_proj",
            "self_attn.qkv_proj",
            dict(_GQA),
        ),
    ]
}
ARCH_KEYS = list(ARCHS)


def build_tiny_model(key: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A seeded, float32, eval-mode tiny random model of architecture ``key`` (see ``ARCHS``)."""
    import transformers

    arch = ARCHS[key]
    config_cls = getattr(transformers, arch.config_class)
    model_cls = getattr(transformers, arch.model_class)
    options = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
        tie_word_embeddings=False,
    )
    options.update(arch.options)
    options.update(overrides)
    config = config_cls(**options)
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32).eval()
    return model


def tiny_gpt2(seed: int = 0, vocab: int = VOCAB, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A seeded, eval-mode tiny random GPT-2 (its linears are transformers' transposed ``Conv1D``)."""
    import transformers

    config = transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=vocab, n_positions=64, bos_token_id=0, eos_token_id=2
    )
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config).to(dtype).eval()


def make_calibration_ids(windows: int = 6, tokens: int = 16, seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    """Seeded random token ids (windows × tokens), int64."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (windows, tokens), generator=g, dtype=torch.long)


@pytest.fixture
def tiny_model():
    """Factory: ``tiny_model("llama-gqa", seed=0, **config_overrides)``."""
    return build_tiny_model


@pytest.fixture
def calibration_ids():
    """Factory: ``calibration_ids(windows=6, tokens=16, seed=0)``."""
    return make_calibration_ids


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return SHARED


@pytest.fixture
def cli_cache(tmp_path, monkeypatch):
    """A private token cache for CLI runs (``D2PRUNE_CACHE``)."""
    monkeypatch.setenv("D2PRUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def decoder_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every decoder linear's weight by full module path, as float32 CPU copies."""
    from d2prune.engine.architecture import find_decoder_stack, find_linears

    stack = find_decoder_stack(model)
    return {
        f"{stack.path}.{i}.{name}": lin.weight.detach().float().cpu().clone()
        for i, layer in enumerate(stack.layers)
        for name, lin in find_linears(layer).items()
    }


def assert_pruned_alike(
    reference: dict[str, torch.Tensor], other: dict[str, torch.Tensor], min_agreement: float, max_rel_diff: float
) -> None:
    """Two prunings of one model (e.g. CPU and CUDA, see ``decoder_weights``) agree: at least
    ``min_agreement`` of the weights are zero in both or in neither, and the weights differ by at most
    ``max_rel_diff`` of their norm (over all linears)."""
    assert reference.keys() == other.keys()
    same = sum(int(((w == 0) == (other[n] == 0)).sum()) for n, w in reference.items())
    total = sum(w.numel() for w in reference.values())
    assert same / total >= min_agreement, f"masks agree on {same / total:.4f} of the weights"
    diff = sum(float((w.double() - other[n].double()).norm() ** 2) for n, w in reference.items()) ** 0.5
    norm = sum(float(w.double().norm() ** 2) for w in reference.values()) ** 0.5
    assert diff <= max_rel_diff * norm, f"weights differ by {diff / norm:.2e} of their norm"


# A tiny word-level tokenizer (--window-bos tests): ids 0-3 are <unk> <pad> <bos> <eos>, then the words.
WORDS = "the cat sat on a mat while dog ran in park and bird sang tall green tree".split()
BOS_ID = 2


def word_tokenizer(bos: bool = True):
    """A fast tokenizer over WORDS and "."; it adds no special tokens, and has a BOS token only if ``bos``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", "<bos>", "<eos>", *WORDS, "."])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    extra = {"bos_token": "<bos>"} if bos else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>", pad_token="<pad>", **extra
    )
