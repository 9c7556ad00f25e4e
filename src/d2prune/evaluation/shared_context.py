"""Zero-shot scoring with each context run once for all of its continuations.

A multiple-choice item is one loglikelihood request per choice, all with the same context (HellaSwag:
four endings after the same ~60-token context; ARC, OpenBookQA and PIQA alike). lm-eval's HFLM runs
context + continuation once per request and shares work only for one-token continuations. Here the
requests of one context are packed into one sequence: the context, then each continuation (without
its last token), with an attention mask that lets every continuation see the context and its own
earlier tokens only, and position ids that restart after the context for each continuation. The
logits at a continuation's positions are then those of its own request, so each answer is the same
(to rounding) while the context is computed once; the LM head runs only at the scored positions.

Requests lm-eval would truncate (longer than the model's window) go through lm-eval's own path. The
first packed group of a run is checked against lm-eval's path; if an architecture does not honour a
custom 4-D mask or position ids, the whole run falls back to lm-eval's path with a warning.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

# |packed − lm-eval| allowed in the check, relative to 1 + |log-likelihood|: float32 forwards differ
# only by summation order; half-precision forwards by more.
TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6}
HALF_TOLERANCE = 3e-2

Request = tuple[Any, list[int], list[int]]


def pack(context: list[int], continuations: list[list[int]]) -> dict[str, Any]:
    """One packed sequence: ids, position ids, the segment of each token (-1: the context, j: the
    j-th continuation) and, per continuation, the sequence positions whose logits predict its tokens."""
    n = len(context)
    ids, positions, segments = list(context), list(range(n)), [-1] * n
    predictors = []
    for j, cont in enumerate(continuations):
        start = len(ids)
        ids += cont[:-1]
        positions += range(n, n + len(cont) - 1)
        segments += [j] * (len(cont) - 1)
        # The context's last token predicts a continuation's first token, its own tokens the rest.
        predictors.append([n - 1, *range(start, start + len(cont) - 1)])
    return {
        "ids": ids,
        "positions": positions,
        "segments": segments,
        "predictors": predictors,
        "continuations": continuations,
    }


def allowed(segments: torch.Tensor) -> torch.Tensor:
    """(T, T) bool: query q may attend key k when k ≤ q and k is context or in q's continuation."""
    t = segments.numel()
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    return causal & ((segments.unsqueeze(0) == -1) | (segments.unsqueeze(0) == segments.unsqueeze(1)))


def shared_context_lm(base: type) -> type:
    """A subclass of lm-eval's HFLM (``base``) that scores loglikelihood requests with shared contexts."""

    class SharedContextLM(base):
        def __init__(self, *args: Any, share_contexts: bool = True, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.share_contexts = share_contexts
            self.sharing = {"requests": 0, "contexts": 0, "tokens_lm_eval": 0, "tokens_run": 0, "checked": None}
            self._keeps_logits: bool | None = None

        def _loglikelihood_tokens(
            self, requests: list[Request], disable_tqdm: bool = False, override_bs: int | None = None
        ) -> list[tuple[float, bool]]:
            if not self.share_contexts or self.backend != "causal":
                return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
            from tqdm.auto import tqdm

            results: list[tuple[float, bool] | None] = [None] * len(requests)
            groups: dict[tuple[int, ...], list[int]] = {}
            own_path = []
            for i, (_, context, cont) in enumerate(requests):
                if not context or not cont or len(context) + len(cont) > self.max_length + 1:
                    own_path.append(i)  # lm-eval truncates these from the left: its own path
                else:
                    groups.setdefault(tuple(context), []).append(i)
            packs = [p for context, members in groups.items() for p in self._split(context, members, requests)]
            scored: list[tuple[list[int], list[tuple[float, bool]]]] = []
            if packs and self.sharing["checked"] is None:
                checked = self._check(packs[0], requests)
                if checked is None:
                    return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
                scored.append((packs[0][0], checked))  # its answers are scored already
            todo = sorted(packs[len(scored) :], key=lambda p: -len(p[1]["ids"]))  # longest first, as lm-eval
            batch = self.batch_size if isinstance(self.batch_size, int) and self.batch_size > 0 else 1

            def answered():
                """(members, answers) of every pack: the checked one, then the rest a batch at a time."""
                yield from scored
                for b0 in range(0, len(todo), batch):
                    chunk = todo[b0 : b0 + batch]
                    yield from zip([m for m, _ in chunk], self._score([p for _, p in chunk]))

            with tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="loglikelihood") as bar:
                for members, answers in answered():
                    for i, answer in zip(members, answers):
                        results[i] = answer
                        if requests[i][0] is not None:
                            self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
                    bar.update(len(members))
                self.sharing["requests"] += len(requests) - len(own_path)
                self.sharing["contexts"] += len(packs)
                self.sharing["tokens_lm_eval"] += sum(
                    len(requests[i][1]) + len(requests[i][2]) - 1 for members, _ in packs for i in members
                )
                self.sharing["tokens_run"] += sum(len(p["ids"]) for _, p in packs)
                if own_path:
                    answers = super()._loglikelihood_tokens([requests[i] for i in own_path], disable_tqdm=True)
                    for i, answer in zip(own_path, answers):
                        results[i] = answer
                    bar.update(len(own_path))
            return results  # type: ignore[return-value]

        def _split(self, context: tuple[int, ...], members: list[int], requests: list[Request]):
            """(members, packed sequence) pieces of one context that each fit the model's window."""
            out, current, length = [], [], len(context)
            for i in members:
                extra = len(requests[i][2]) - 1
                if current and length + extra > self.max_length:
                    out.append(current)
                    current, length = [], len(context)
                current.append(i)
                length += extra
            out.append(current)
            return [(m, pack(list(context), [requests[i][2] for i in m])) for m in out]

        def _check(self, piece, requests: list[Request]) -> list[tuple[float, bool]] | None:
            """The first packed group against lm-eval's own scoring: its packed answers, or None (and a
            warning) if they differ."""
            members, packed = piece
            theirs = super()._loglikelihood_tokens([requests[i] for i in members], disable_tqdm=True)
            try:
                ours = self._score([packed])[0]
            except Exception as exc:  # a model whose forward takes no 4-D mask or position ids
                return self._fall_back({"error": f"{type(exc).__name__}: {str(exc)[:200]}"})
            tol = TOLERANCE.get(self._logits_dtype, HALF_TOLERANCE)
            worst = max(abs(a[0] - b[0]) / (1 + abs(b[0])) for a, b in zip(ours, theirs))
            check = {"largest_relative_difference": worst, "tolerance": tol}
            if not worst <= tol:
                return self._fall_back(check)
            self.sharing["checked"] = check
            return ours

        def _fall_back(self, check: dict[str, Any]) -> None:
            log.warning(
                "zero-shot: scoring with shared contexts does not reproduce lm-eval's on this model (%s); "
                "every request goes through lm-eval's own path",
                check,
            )
            self.share_contexts = False
            self.sharing["checked"] = {**check, "fell_back": True}

        def _score(self, packs: list[dict[str, Any]]) -> list[list[tuple[float, bool]]]:
            """(log-likelihood, greedy) of every continuation of each packed sequence, one forward."""
            model = self.model
            device = torch.device(self.device)
            width = max(len(p["ids"]) for p in packs)
            ids = torch.zeros(len(packs), width, dtype=torch.long)
            positions = torch.zeros(len(packs), width, dtype=torch.long)
            mask = torch.eye(width, dtype=torch.bool).repeat(len(packs), 1, 1)  # padding sees itself only
            for b, p in enumerate(packs):
                t = len(p["ids"])
                ids[b, :t] = torch.tensor(p["ids"])
                positions[b, :t] = torch.tensor(p["positions"])
                mask[b, :t, :t] = allowed(torch.tensor(p["segments"]))
            scored = sorted({q for p in packs for predictor in p["predictors"] for q in predictor})
            column = {q: c for c, q in enumerate(scored)}
            dtype = model.get_input_embeddings().weight.dtype
            additive = torch.zeros(mask.shape, dtype=dtype).masked_fill_(~mask, torch.finfo(dtype).min)
            kwargs: dict[str, Any] = {
                "input_ids": ids.to(device),
                "attention_mask": additive.unsqueeze(1).to(device),
                "position_ids": positions.to(device),
                "use_cache": False,
            }
            if self._keeps_logits is None:  # whether the forward can skip the LM head elsewhere
                self._keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
            keep = self._keeps_logits
            if keep:
                kwargs["logits_to_keep"] = torch.tensor(scored, device=device)
            mixed = getattr(self, "mixed_precision_dtype", None)
            with torch.no_grad(), torch.autocast(device.type, dtype=mixed, enabled=mixed is not None):
                logits = model(**kwargs).logits
            self._logits_dtype = logits.dtype
            if not keep:
                logits = logits[:, scored]
            logprobs = torch.log_softmax(logits, dim=-1, dtype=self.softmax_dtype)
            out = []
            for b, p in enumerate(packs):
                answers = []
                for predictor, cont in zip(p["predictors"], p["continuations"]):
                    rows = logprobs[b, [column[q] for q in predictor]]
                    tokens = torch.tensor(cont, device=rows.device)
                    ll = float(rows.gather(1, tokens.unsqueeze(1)).sum())
                    answers.append((ll, bool((rows.argmax(dim=-1) == tokens).all())))
                out.append(answers)
            return out

    return SharedContextLM
