"""The interface every pruning method implements, and the method registry.

A method sees one linear at a time: it observes batches of (input, output) of that linear and then
prunes its weight. It never sees layers or models; the engine (``d2prune.engine``) owns those.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch

from d2prune.errors import UserError
from d2prune.patterns import SparsityTarget


class Statistic:
    """Calibration statistics accumulated over samples, which data-parallel ranks can sum.

    On one process only ``add``-style accumulation runs. With several ranks (``d2prune.engine.distributed``)
    each rank observes a share of the calibration windows; the engine then sums every tensor of
    ``statistics()`` over the ranks, in place, and hands the sums back to ``load_statistics``.
    """

    def begin(self, first_sample: int) -> None:
        """Called before the first sample: this process observes the calibration windows from global
        index ``first_sample`` on (0 on one process). Only position-dependent statistics need it."""

    def statistics(self) -> dict[str, torch.Tensor]:
        """The accumulated values as sums over this process's samples, counts included."""
        raise NotImplementedError

    def load_statistics(self, sums: dict[str, torch.Tensor]) -> None:
        """Take the sums over all ranks (the tensors of ``statistics()``, summed)."""
        raise NotImplementedError


def count_tensor(n: int, device: torch.device | str) -> torch.Tensor:
    """A sample count as a tensor that ranks can sum (float64 holds integers exactly up to 2⁵³)."""
    return torch.tensor([float(n)], dtype=torch.float64, device=device)


def _blocks(width: int) -> list[tuple[int, int]]:
    """The column blocks of a Gram of ``width``: up to 4, at least 128 wide."""
    n = max(1, min(4, width // 128))
    step = -(-width // n)
    return [(i, min(i + step, width)) for i in range(0, width, step)]


def _block_pairs(width: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(upper, lower) block pairs off the diagonal: the sum's block (a, b) above it, copied to (b, a)."""
    blocks = _blocks(width)
    return [(a, b) for i, a in enumerate(blocks) for b in blocks[i + 1 :]]


class Gram(Statistic):
    """Running sum of X Xᵀ over calibration samples for one linear input.

    Linears that read the same tensor (q/k/v, gate/up) share one Gram, built by the engine, so
    the c×c product is paid once per distinct input. Each batch's product is a float32 matmul; the
    products are summed in float64 (an elementwise add per batch, next to the matmul's c²·tokens
    work), so the Hessian does not depend on how the windows were batched or split over ranks: one
    process and several ranks then give the same float32 Hessian, bar rare last-bit roundings.
    """

    def __init__(self, width: int, device: torch.device | str):
        self._sum = torch.zeros(width, width, dtype=torch.float64, device=device)
        self._lower_pending = False
        self.nsamples = 0
        # What methods derive from the finished Gram (e.g. ALPS's eigendecomposition), so the
        # linears that share it (q/k/v, gate/up) compute it once.
        self.cache: dict = {}

    @property
    def sum(self) -> torch.Tensor:
        """Σ X Xᵀ (float64, c×c): ``add`` fills the blocks on and above the diagonal; the blocks
        below are copied from them here, once, when the sum is first read."""
        if self._lower_pending:
            for (a0, a1), (b0, b1) in _block_pairs(self._sum.shape[0]):
                self._sum[b0:b1, a0:a1] = self._sum[a0:a1, b0:b1].t()
            self._lower_pending = False
        return self._sum

    @sum.setter
    def sum(self, value: torch.Tensor) -> None:
        self._sum, self._lower_pending = value, False

    def add(self, x: torch.Tensor) -> None:
        """Add a batch ``x`` of shape (batch, tokens, width)."""
        flat = x.reshape(-1, x.shape[-1]).float()
        # XᵀX is symmetric: only the column blocks on and right of each diagonal block are
        # multiplied (float32 products, accumulated in float64), ~0.6× the work of the full product
        # for wide inputs (a down_proj's).
        for b0, b1 in _blocks(flat.shape[1]):
            self._sum[b0:b1, b0:] += flat[:, b0:b1].t() @ flat[:, b0:]
        self._lower_pending = True
        self.nsamples += x.shape[0] if x.dim() > 2 else 1

    def hessian(self) -> torch.Tensor:
        """SparseGPT's H = (2/N) Σ_k X_k X_kᵀ with N calibration samples (a new float32 tensor)."""
        scale = 2.0 / max(self.nsamples, 1)
        out = torch.empty(self.sum.shape, dtype=torch.float32, device=self.sum.device)
        # Row chunks of ~32 MiB, so no float64 temporary of the full c×c size exists.
        step = max(1, (1 << 22) // max(1, self.sum.shape[-1]))
        for i in range(0, self.sum.shape[0], step):
            out[i : i + step] = self.sum[i : i + step] * scale
        return out

    def statistics(self) -> dict[str, torch.Tensor]:
        return {"sum": self.sum, "nsamples": count_tensor(self.nsamples, self.sum.device)}

    def load_statistics(self, sums: dict[str, torch.Tensor]) -> None:
        self.sum = sums["sum"]
        self.nsamples = int(sums["nsamples"].item())


def derived(gram: Gram, key: Any, compute: Callable[[], Any]) -> Any:
    """``compute()`` once per ``gram`` and ``key``, kept in the Gram's cache: what several linears
    derive from one shared Gram (a factor, an eigendecomposition). A Gram-like object without a
    cache computes it every time."""
    cache = getattr(gram, "cache", None)
    if cache is None:
        return compute()
    if key not in cache:
        cache[key] = compute()
    return cache[key]


class LinearPruner:
    """Statistics and pruning for one linear. Subclasses override ``observe`` and ``prune``."""

    needs_gram: ClassVar[bool] = False
    updates_weights: ClassVar[bool] = False
    # Whether the run-level refit (``PruneConfig.refit``) may replace this pruner's weights by the
    # least-squares optimum on its mask. A method that deliberately leaves some linears' kept
    # weights as they are (D²Prune's no-update branch) sets it False for those.
    refit_allowed: bool = True

    # Input-channel permutation (RIA's N:M channel permutation, see ``d2prune.engine.channels``). A pruner
    # with ``may_permute_inputs`` gets ``inputs_permutable`` set by the engine before ``prune`` when
    # this linear's input columns can be permuted exactly, together with the output rows of the
    # linears producing its input. ``prune`` may then set ``input_permutation`` (a LongTensor: stored
    # column k becomes column ``perm[k]``) and return the weight still in the original column order;
    # the engine stores the permuted order. ``may_permute_inputs`` must be the same on every rank.
    may_permute_inputs: bool = False
    inputs_permutable: bool = False
    input_permutation: torch.Tensor | None = None

    def __init__(self, name: str, weight: torch.Tensor):
        self.name = name
        self.rows, self.cols = weight.shape
        self.device = weight.device

    def observe(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Accumulate statistics from input ``x`` (batch, tokens, cols) and output ``y`` (batch, tokens, rows)."""

    def prune(self, weight: torch.Tensor, target: SparsityTarget, gram: Gram | None) -> torch.Tensor:
        """Return the pruned weight (float32, same shape); ``gram`` is set when ``needs_gram``."""
        raise NotImplementedError

    # Data-parallel calibration: ranks sum the statistics of ``observe`` before ``prune`` runs. By
    # default they are the pruner's ``Statistic`` attributes; a pruner that accumulates elsewhere
    # overrides ``statistics``/``load_statistics`` (and ``begin`` if a sample's position matters).

    def _statistic_attributes(self) -> dict[str, Statistic]:
        return {name: value for name, value in vars(self).items() if isinstance(value, Statistic)}

    def begin(self, first_sample: int) -> None:
        """Called before ``observe``: the global index of this process's first calibration window."""
        for stat in self._statistic_attributes().values():
            stat.begin(first_sample)

    def statistics(self) -> dict[str, torch.Tensor]:
        """Everything ``observe`` accumulated, as tensors to sum over ranks (see ``Statistic``)."""
        stats = self._statistic_attributes()
        if not stats and type(self).observe is not LinearPruner.observe:
            raise NotImplementedError(
                f"{type(self).__name__} observes activations but keeps no Statistic attributes; to run on "
                "several ranks it must override statistics() and load_statistics()"
            )
        return {f"{attr}.{key}": t for attr, stat in stats.items() for key, t in stat.statistics().items()}

    def load_statistics(self, sums: dict[str, torch.Tensor]) -> None:
        """Take the statistics summed over all ranks (the keys of ``statistics()``)."""
        for attr, stat in self._statistic_attributes().items():
            prefix = attr + "."
            stat.load_statistics({k[len(prefix) :]: t for k, t in sums.items() if k.startswith(prefix)})

    def work(self) -> int:
        """Relative cost of ``prune``, to balance linears over ranks: the weight's size, times its
        width for methods that solve with the cols×cols Hessian (OBS updates are O(rows·cols²))."""
        return self.rows * self.cols * (self.cols if self.needs_gram else 1)


# Command-line options come from the config fields' ``metadata`` (``d2prune.cli`` adds one option per
# distinct flag over all registered methods; a flag shared by several methods, e.g. --percdamp, must
# carry the same metadata everywhere). The keys it reads:
#   "flags"       option strings, the first one canonical; a field without flags has no option
#   "help"        help text;  "group": title of its section of ``d2prune prune --help``
#   "nargs"       as argparse's (a bool field is a switch: --x, or --x/--no-x when its default is True)
#   "parse"       callable from the parsed value to the field's value; None means "as if not given"
#   "cli_default" the value used when the flag is absent, where it must differ from the field default
#   "method_name" the field names another registered method, built from the same options
#   "text_source" the flag names a text source that the command line reads into token windows, like
#                 the calibration data; the value says what for (in messages: "reading the ... data")
#   "only_for"    giving the flag to a method that (with the methods it builds) lacks the field is a
#                 mistake; the value names the methods that have it, for the message
#   "heldout"     {"value", "choice", "for"}: this flag value asks for a choice on held-out data
#                 (``MethodConfig.heldout_candidates``): what is chosen, and which methods can
REFIT_GROUP = "refit: exact least squares on each linear's mask, after any method"
# The option value that leaves a choice to held-out data (``--target-layers auto``, ``--alps-rho auto``).
AUTO = "auto"


def option(*flags: str, help: str, group: str | None = None, **extra: Any) -> dict[str, Any]:
    """The ``metadata`` of a config field with a command-line option (see the keys above)."""
    return {"flags": tuple(flags), "help": help, "group": group, **extra}


def parse_names(values: list[str], what: str) -> list[str]:
    """Names from ``a b``, ``a,b`` or the paper repository's ``"['a', 'b']"``; 'none' means []."""
    names: list[str] = []
    for value in values:
        value = value.strip()
        if value.startswith("["):
            try:
                parsed = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                raise UserError(f"cannot parse {what} list {value!r}") from None
            names.extend(str(v) for v in parsed)
        elif value.lower() != "none":
            names.extend(v for v in value.split(",") if v)
    return names


def optional_text(value: str) -> str | None:
    """An option value where the empty string means "not given"."""
    return value or None


@dataclass
class MethodConfig:
    """Base of the per-method config dataclasses; ``name`` is the registry key."""

    name: ClassVar[str] = ""
    # Methods that score with gradients of the LM loss (Pruner-Zero) get them in ``prepare``, a
    # model-level gradient pass before layer-wise pruning (see gradients.py).
    needs_gradients: ClassVar[bool] = False
    # The run record's key for the result of a held-out choice (``heldout_candidates``).
    heldout_record_key: ClassVar[str] = "heldout_choice"

    def streaming_obstacle(self) -> str | None:
        """Why this method cannot prune a model streamed from disk one layer at a time (None: it can)."""
        if self.needs_gradients:
            return f"{self.name} needs a full-model gradient pass"
        return None

    def requires_refit(self) -> bool:
        """Whether an option of this method only works with the run-level refit (``PruneConfig.refit``)."""
        return False

    def chooses_on_heldout(self) -> bool:
        """Whether some option is left to a choice on held-out data (``heldout_candidates``)."""
        return False

    def heldout_candidates(self, linear_names: list[str]) -> dict[str, MethodConfig]:
        """The configs to choose from on held-out data, by label, given a decoder layer's linears
        (``d2prune.selection`` prunes with each and keeps the best); empty: nothing to choose."""
        return {}

    def prepare(
        self,
        model: torch.nn.Module,
        batches: list[dict[str, torch.Tensor]],
        device: torch.device,
        progress: bool,
        dtype: torch.dtype | None = None,
    ) -> MethodConfig:
        """Model-level work before the layer walk, on the dense model and all calibration ``batches``
        (every rank's), its forwards in ``dtype`` (None: the model's; ``engine.precision``): returns
        the config to prune with. Default: unchanged."""
        return self

    def make_pruner(self, name: str, weight: torch.Tensor, path: str = "") -> LinearPruner:
        """A pruner for the linear ``name`` (module-relative, e.g. ``self_attn.q_proj``) whose full
        module path in the model is ``path`` (e.g. ``model.layers.3.self_attn.q_proj``)."""
        raise NotImplementedError

    def resolve(self, model_info: dict[str, Any]) -> MethodConfig:
        """Fill options that depend on the model (e.g. D²Prune's auto_s); default: unchanged."""
        return self

    def validate(self, linear_names: list[str], layer_class: str) -> None:
        """Check options that name linears against a decoder layer's linears."""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self)}


METHODS: dict[str, type[MethodConfig]] = {}


def register(cls: type[MethodConfig]) -> type[MethodConfig]:
    """Class decorator: make a method config available by its ``name``."""
    METHODS[cls.name] = cls
    return cls


def method_config(name_or_config: str | MethodConfig, **options: Any) -> MethodConfig:
    """A method's config from its registry name (with options) or an existing config."""
    if isinstance(name_or_config, MethodConfig):
        return name_or_config
    key = str(name_or_config).strip().lower()
    if key not in METHODS:
        raise UserError(f"unknown method {name_or_config!r}: choose one of {', '.join(sorted(METHODS))}")
    return METHODS[key](**options)
