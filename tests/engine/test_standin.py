"""The stand-in layer, the walk's start and on_layer_done, the executor and the method hooks."""

from __future__ import annotations

import pytest
import torch

import d2prune
from conftest import build_tiny_model, make_calibration_ids
from d2prune.engine.architecture import find_decoder_stack, find_linears
from d2prune.engine.capture import calibration_batches
from d2prune.engine.executor import Local, current_executor
from d2prune.engine.standin import StandIn, StopForward, standing_in
from d2prune.engine.walk import LayerStore, prune_layers


def test_stand_ins_are_swapped_in_and_always_restored():
    model = build_tiny_model("llama-gqa")
    stack = find_decoder_stack(model)
    originals = list(stack.layers)
    with pytest.raises(RuntimeError, match="boom"):
        with standing_in(stack, [0, 1]) as standins:
            assert [stack.layers[0], stack.layers[1]] == standins
            assert all(isinstance(s, StandIn) for s in standins)
            raise RuntimeError("boom")
    assert list(stack.layers) == originals


def test_a_stand_in_records_stops_injects_and_answers_as_its_layer():
    model = build_tiny_model("llama-gqa")
    stack = find_decoder_stack(model)
    attention = stack.layers[0].self_attn
    ids = make_calibration_ids(2, 8)
    with standing_in(stack, range(2), record=True, stop_at=1) as standins:
        with pytest.raises(StopForward):
            model(input_ids=ids, use_cache=False)
        assert [s.count for s in standins] == [1, 1]
        hidden0, _, kwargs = standins[0].calls[0]
        hidden1 = standins[1].calls[0][0]
        assert hidden1 is hidden0 and hidden0.shape[:2] == ids.shape  # layer 0 handed its input on
        assert standins[0].self_attn is attention  # attributes of the layer
    with standing_in(stack, range(len(stack.layers))) as standins:
        dense = model(input_ids=ids, use_cache=False).logits
        standins[0].inject = torch.zeros_like(hidden0)
        zero = model(input_ids=ids, use_cache=False).logits
    assert not torch.equal(dense, zero)  # the injected hidden states reached the head


def test_the_walk_starts_where_asked_and_reports_each_layer_done():
    model = build_tiny_model("llama-gqa")
    config = d2prune.PruneConfig(method="wanda", progress=False, batch_size=2)
    full = build_tiny_model("llama-gqa")
    d2prune.prune(full, make_calibration_ids(4, 16), config)

    # Layer 0 pruned as the full run did; the walk re-runs it from the layer-0 inputs and goes on.
    stack = find_decoder_stack(model)
    pruned = find_linears(find_decoder_stack(full).layers[0])
    for name, lin in find_linears(stack.layers[0]).items():
        lin.weight.data.copy_(pruned[name].weight.data)
    executor = Local()
    batches = executor.shard(calibration_batches(make_calibration_ids(4, 16), 2))
    targets = [config.target(i, len(stack.layers)) for i in range(len(stack.layers))]
    report = d2prune.PruneReport(config={})
    timings = {"capture": 0.0, "statistics": 0.0, "prune": 0.0, "pruned_forward": 0.0}
    done: list[int] = []
    prune_layers(
        model,
        batches,
        config.method,
        targets,
        config,
        report,
        timings,
        store=LayerStore(),
        executor=executor,
        start=1,
        on_layer_done=lambda i, acts: done.append(i),
    )
    assert done == list(range(1, len(stack.layers)))
    assert "resume_forward" in timings
    for a, b in zip(model.parameters(), full.parameters()):
        assert torch.equal(a, b)


def test_one_process_runs_the_local_executor():
    executor = current_executor()
    assert isinstance(executor, Local) and executor.size == 1 and executor.rank == 0
    assert executor.owners({"a": 3, "b": 5}) == {"a": 0, "b": 0}
    batches = calibration_batches(make_calibration_ids(4, 16), 2)
    assert executor.shard(batches) == batches and executor.first_window == 0


def test_method_hooks():
    model = build_tiny_model("llama-gqa")
    batches = calibration_batches(make_calibration_ids(2, 8), 1)
    wanda = d2prune.WandaConfig()
    assert wanda.prepare(model, batches, torch.device("cpu"), False) is wanda and wanda.streaming_obstacle() is None
    assert d2prune.PrunerZeroConfig().streaming_obstacle() and d2prune.PrunerZeroConfig.needs_gradients
    dsnot = d2prune.DSnoTConfig(base="sparsegpt")
    assert dsnot.prepare(model, batches, torch.device("cpu"), False) is dsnot and dsnot.streaming_obstacle() is None
    grads = {"x": torch.zeros(1)}
    prepared = d2prune.PrunerZeroConfig(gradients=grads).prepare(model, batches, torch.device("cpu"), False)
    assert prepared.gradients is grads  # given gradients are kept, no gradient pass
