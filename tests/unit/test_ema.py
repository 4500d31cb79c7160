"""ParameterEMA against the closed-form average, and its asynchrony, checkpointing and swapping."""

import threading

import pytest
import torch

from megatron_dsv3.config import ConfigError
from megatron_dsv3.training.ema import ParameterEMA, named_trainable_parameters

DECAY = 0.9


def two_chunks():
    torch.manual_seed(0)
    first = torch.nn.Linear(8, 4)
    second = torch.nn.Sequential(torch.nn.Linear(4, 3, bias=False), torch.nn.LayerNorm(3)).to(torch.bfloat16)
    return [first, second]


def set_parameters(params, step):
    """A known, step-dependent value for every parameter (the `optimizer.step()` of the test)."""
    with torch.no_grad():
        for index, param in enumerate(params.values()):
            param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(100 * step + index)))


def test_average_matches_the_closed_form_over_k_updates():
    params = named_trainable_parameters(two_chunks())
    assert sorted(params) == ["model0.bias", "model0.weight", "model1.0.weight", "model1.1.bias", "model1.1.weight"]
    history = [{name: p.detach().double().clone() for name, p in params.items()}]
    ema = ParameterEMA(params, decay=DECAY)
    k = 12
    for step in range(1, k + 1):
        set_parameters(params, step)
        history.append({name: p.detach().double().clone() for name, p in params.items()})
        ema.update()
    state = ema.state_dict()
    assert state["num_updates"] == k
    for name in params:
        # ema_k = d^k p_0 + sum_{i=1..k} (1 - d) d^(k-i) p_i
        reference = DECAY**k * history[0][name] + sum((1 - DECAY) * DECAY ** (k - i) * history[i][name] for i in range(1, k + 1))
        average = state["averages"][name]
        assert average.dtype == torch.float32 and average.device.type == "cpu"
        torch.testing.assert_close(average.double(), reference, rtol=1e-6, atol=3e-7)  # observed error ~6e-8


def test_update_returns_before_the_fold_and_folds_the_snapshot_not_later_values(monkeypatch):
    param = torch.nn.Parameter(torch.zeros(5))
    ema = ParameterEMA({"w": param}, decay=0.5)
    fold_may_run, folded = threading.Event(), threading.Event()
    fold = ema._fold_snapshot_into_average

    def gated_fold():
        assert fold_may_run.wait(timeout=30), "the test never opened the gate"
        fold()
        folded.set()

    monkeypatch.setattr(ema, "_fold_snapshot_into_average", gated_fold)
    with torch.no_grad():
        param.fill_(2.0)
    ema.update()  # would block for 30 s and fail if the fold ran on this thread
    assert not folded.is_set()
    with torch.no_grad():
        param.fill_(100.0)  # the next optimizer step, while the fold waits: must not leak into the average

    second_update = threading.Thread(target=ema.update)
    second_update.start()
    second_update.join(timeout=0.2)
    assert second_update.is_alive(), "update() must wait for the fold in flight before reusing the snapshot buffers"
    assert not folded.is_set()

    fold_may_run.set()
    second_update.join(timeout=30)
    ema.wait()
    # 0 -> 0.5 * 0 + 0.5 * 2 = 1 -> 0.5 * 1 + 0.5 * 100 = 50.5
    torch.testing.assert_close(ema.state_dict()["averages"]["w"], torch.full((5,), 50.5), rtol=0, atol=0)


def _ema_after_three_updates():
    """(chunks, their named parameters, an EMA updated with the parameters set to 1, 2, 3)."""
    chunks = two_chunks()
    params = named_trainable_parameters(chunks)
    ema = ParameterEMA(chunks, decay=DECAY)
    for step in range(1, 4):
        set_parameters(params, step)
        ema.update()
    return chunks, params, ema


def test_state_dict_round_trip_is_exact():
    chunks, params, ema = _ema_after_three_updates()
    saved = ema.state_dict()

    restored = ParameterEMA(chunks, decay=DECAY)
    restored.load_state_dict(saved)
    assert restored.state_dict()["num_updates"] == 3
    for name, average in restored.state_dict()["averages"].items():
        assert torch.equal(average, saved["averages"][name])

    set_parameters(params, 4)  # both continue identically
    ema.update()
    restored.update()
    for name, average in restored.state_dict()["averages"].items():
        assert torch.equal(average, ema.state_dict()["averages"][name])


def test_load_state_dict_rejects_another_model_or_decay():
    chunks = two_chunks()
    saved = ParameterEMA(chunks, decay=DECAY).state_dict()
    with pytest.raises(KeyError, match="missing .*model1"):
        ParameterEMA(chunks[0], decay=DECAY).load_state_dict(saved)
    with pytest.raises(ValueError, match="decay=0.9"):
        ParameterEMA(chunks, decay=0.99).load_state_dict(saved)


def test_swapped_in_puts_the_average_in_and_restores_training_weights_bit_exactly():
    chunks, params, ema = _ema_after_three_updates()
    training = {name: p.detach().clone() for name, p in params.items()}
    averages = ema.state_dict()["averages"]

    with pytest.raises(RuntimeError, match="evaluation failed"):
        with ema.swapped_in():
            for name, param in params.items():
                assert torch.equal(param.detach(), averages[name].to(param.dtype))
            raise RuntimeError("evaluation failed")  # the training weights come back even so
    for name, param in params.items():
        assert torch.equal(param.detach(), training[name])


@pytest.mark.parametrize("decay", [-0.1, 1.0, 1.5, float("nan")])
def test_bad_decay_raises_naming_field_value_and_fix(decay):
    with pytest.raises(ConfigError, match=r"decay=.*\[0, 1\).*Fix: pass e.g. decay=0.999"):
        ParameterEMA({"w": torch.zeros(2)}, decay=decay)
