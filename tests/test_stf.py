"""The Straight-Through Factorizer on tiny models: forward, straight-through gradients, schedule, refresh,
factor state, finalize, and feasibility checks."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY_MODELS, default_targets, model_inputs, model_output
from safetensors.torch import load_file, save_file
from torch import nn

from dsformer import InfeasibleRatioError
from dsformer.report import model_bytes
from dsformer.stf import STF, Schedule, STFLinear
from dsformer.structures import (
    DenseSparseConfig,
    DenseSparseLinear,
    LowRankConfig,
    LowRankLinear,
    NMConfig,
    NMLinear,
)
from dsformer.surgery import linear_weight

STRUCTURES = {
    # on the tiny random weights the k search picks s == k (low rank); ds-sparse fixes k=32, s=16
    "ds": (lambda: DenseSparseConfig(ratio=2, iters=3, search_points=2), DenseSparseLinear),
    "ds-sparse": (lambda: DenseSparseConfig(ratio=None, gamma=0.5, delta=0.5, iters=3), DenseSparseLinear),
    "svd": (lambda: LowRankConfig(ratio=2), LowRankLinear),
    "nm": (lambda: NMConfig(ratio=2), NMLinear),
}
NAMES = list(STRUCTURES)


def wrapped(structure: str, model: str = "bert", schedule: Schedule | None = None) -> tuple[nn.Module, STF]:
    net = TINY_MODELS[model]()
    return net, STF.wrap(net, STRUCTURES[structure][0](), schedule=schedule)


def with_weights(model: str, weights: dict[str, torch.Tensor]) -> nn.Module:
    """A fresh tiny model whose named linears hold the given ``(out, in)`` weights."""
    net = TINY_MODELS[model]()
    with torch.no_grad():
        for name, w in weights.items():
            module = net.get_submodule(name)
            module.weight.copy_(w if isinstance(module, nn.Linear) else w.T)
    return net


def perturb(stf: STF, scale: float = 0.5, seed: int = 3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer, _ in stf.layers.values():
            layer.weight.add_(scale * layer.weight.std() * torch.randn(layer.weight.shape, generator=gen))


def stf_layers(net: nn.Module) -> list[str]:
    return [name for name, mod in net.named_modules() if isinstance(mod, STFLinear)]


@pytest.mark.parametrize("model", ["bert", "gpt2"])
@pytest.mark.parametrize("structure", NAMES)
def test_wrap_replaces_targets_and_forward_uses_projection(structure: str, model: str) -> None:
    net, stf = wrapped(structure, model)
    assert sorted(stf.layers) == sorted(default_targets(model)) == sorted(stf_layers(net))
    for layer, _ in stf.layers.values():
        assert layer.ramp == 1.0
        assert not torch.equal(layer.projected, layer.weight)  # a real projection, not a copy
    projected = {name: layer.projected for name, (layer, _) in stf.layers.items()}
    original = {name: layer.weight.detach() for name, (layer, _) in stf.layers.items()}
    torch.testing.assert_close(model_output(net), model_output(with_weights(model, projected)), atol=1e-5, rtol=0)
    # λ = 0 computes with the latent (pretrained) weight itself, λ = 0.3 with the mix
    stf.schedule = Schedule(ramp_steps=10, ramp_start=0.0)
    stf.set_step(0)
    torch.testing.assert_close(model_output(net), model_output(TINY_MODELS[model]()), atol=1e-6, rtol=0)
    stf.schedule = Schedule(ramp_steps=10, ramp_start=0.3)
    stf.set_step(0)
    mixed = {name: 0.7 * original[name] + 0.3 * projected[name] for name in projected}
    torch.testing.assert_close(model_output(net), model_output(with_weights(model, mixed)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("ramp", [1.0, 0.4])
@pytest.mark.parametrize("structure", NAMES)
def test_gradients_are_straight_through(structure: str, ramp: float) -> None:
    """∂L/∂W̃ reaches the latent weight and equals ∂L/∂Ŵ of a plain model computing with Ŵ."""
    net, stf = wrapped(structure)
    stf.schedule = Schedule(ramp_steps=10, ramp_start=ramp)
    stf.set_step(0)
    w_hat = {
        name: (1 - ramp) * layer.weight.detach() + ramp * layer.projected for name, (layer, _) in stf.layers.items()
    }
    reference = with_weights("bert", w_hat)
    inputs = model_inputs()
    target = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(5))
    for m in (net, reference):
        (m(**inputs).last_hidden_state * target).sum().backward()
    for name, (layer, _) in stf.layers.items():
        assert layer.weight.grad is not None, name
        assert layer.weight.grad.abs().sum() > 0, name
        assert layer.projected.grad is None  # a buffer, never trained
        ref = reference.get_submodule(name)
        torch.testing.assert_close(layer.weight.grad, ref.weight.grad, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(layer.bias.grad, ref.bias.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("follow", [True, False])
@pytest.mark.parametrize("structure", NAMES)
def test_between_refreshes_training_follows_the_latent_and_evaluation_sees_the_projection(
    structure: str, follow: bool
) -> None:
    """``follow``: training computes with Π(W̃ᵣ) + (W̃ - W̃ᵣ); held: with Π(W̃ᵣ); evaluation always with Π(W̃ᵣ)."""
    net, stf = wrapped(structure, schedule=Schedule(follow=follow))
    anchors = {name: layer.weight.detach().clone() for name, (layer, _) in stf.layers.items()}
    projected = {name: layer.projected.clone() for name, (layer, _) in stf.layers.items()}
    perturb(stf, scale=0.1)  # an optimizer step, no refresh after it
    moved = {name: layer.weight.detach() - anchors[name] for name, (layer, _) in stf.layers.items()}
    training = {name: projected[name] + (moved[name] if follow else 0) for name in projected}
    torch.testing.assert_close(model_output(net), model_output(with_weights("bert", training)), atol=1e-5, rtol=0)
    for layer, _ in stf.layers.values():  # evaluation mode for the STF layers alone: dropout stays as it was
        layer.eval()
    torch.testing.assert_close(model_output(net), model_output(with_weights("bert", projected)), atol=1e-5, rtol=0)
    for layer, _ in stf.layers.values():
        layer.train()
    stf.refresh()  # the anchor moves to the latent: training computes with the new projection exactly
    fresh = {name: layer.projected for name, (layer, _) in stf.layers.items()}
    for layer, _ in stf.layers.values():
        assert torch.equal(layer.anchor, layer.weight.detach())
    torch.testing.assert_close(model_output(net), model_output(with_weights("bert", fresh)), atol=1e-5, rtol=0)


def test_schedule_ramp() -> None:
    schedule = Schedule(ramp_steps=10, ramp_start=0.2)
    values = [schedule.ramp(step) for step in range(13)]
    assert values[0] == 0.2
    assert values[5] == pytest.approx(0.6)
    assert values[9] == pytest.approx(0.92)
    assert values[10:] == [1.0, 1.0, 1.0]  # exactly 1 from ramp_steps on
    assert all(a < b for a, b in zip(values[:10], values[1:11], strict=True))
    assert schedule.ramp(10_000) == 1.0
    assert [Schedule().ramp(s) for s in (0, 1, 100)] == [1.0, 1.0, 1.0]  # no ramp: always 1
    assert Schedule(ramp_steps=4).ramp(0) == 0.0


def test_set_step_sets_every_layers_ramp() -> None:
    _, stf = wrapped("nm", schedule=Schedule(ramp_steps=10, ramp_start=0.2))
    assert {layer.ramp for layer, _ in stf.layers.values()} == {0.2}  # wrap starts at step 0
    stf.set_step(5)
    assert [layer.ramp for layer, _ in stf.layers.values()] == [pytest.approx(0.6)] * len(stf.layers)
    stf.step(10)
    assert {layer.ramp for layer, _ in stf.layers.values()} == {1.0}


@pytest.mark.parametrize("structure", NAMES)
def test_refresh(structure: str) -> None:
    net, stf = wrapped(structure)
    before = {name: layer.projected.clone() for name, (layer, _) in stf.layers.items()}
    errors = {name: (layer.projected - layer.weight).norm() for name, (layer, _) in stf.layers.items()}
    unchanged = stf.refresh()
    assert unchanged == stf.support_change
    if structure == "ds-sparse":
        # more warm-started rounds on unchanged weights may still swap a few atoms (the fit goes on
        # improving), but never make the projection worse
        assert 0.0 <= unchanged < 0.05
        for name, (layer, _) in stf.layers.items():
            assert (layer.projected - layer.weight).norm() <= errors[name] * (1 + 1e-5), name
    else:  # the weights did not change: neither does the support or the projection
        assert unchanged == 0.0
        for name, (layer, _) in stf.layers.items():
            torch.testing.assert_close(layer.projected, before[name], atol=1e-5, rtol=0)
    perturb(stf)
    rate = stf.refresh()
    assert rate == stf.support_change
    assert 0.0 <= rate <= 1.0
    if structure in ("ds-sparse", "nm"):
        assert rate > 0.0
    if structure == "svd":
        assert rate == 0.0  # low rank has no discrete support
    for name, (layer, config) in stf.layers.items():
        assert (layer.projected - before[name]).norm() > 0.1 * before[name].norm(), name
        # the new projection is the structure's projection of the new latent weight
        if structure in ("svd", "nm"):
            (fresh,) = config.fit([layer.weight.detach()])
            torch.testing.assert_close(layer.projected, fresh.reconstruct(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("every", [1, 3, 4])
def test_step_refreshes_every_n_steps(every: int, monkeypatch: pytest.MonkeyPatch) -> None:
    _, stf = wrapped("nm", schedule=Schedule(refresh_every=every))
    calls: list[int] = []
    monkeypatch.setattr(stf, "refresh", lambda *a, **k: calls.append(1) or 0.0)
    refreshed = [step for step in range(1, 13) if stf.step()]  # the loop's own count, or STF's
    assert refreshed == [s for s in range(1, 13) if s % every == 0]
    assert len(calls) == len(refreshed)
    assert stf.step(13) == (13 % every == 0) and stf.steps == 13 and stf.step(14, refresh=True)  # a forced refresh


@pytest.mark.parametrize("pull", [0.0, 0.25, 1.0])
def test_pull_moves_latents_toward_their_projection(pull: float) -> None:
    _, stf = wrapped("nm", schedule=Schedule(refresh_every=100, pull=pull))
    perturb(stf)
    before = {name: (layer.weight.detach().clone(), layer.projected.clone()) for name, (layer, _) in stf.layers.items()}
    assert not stf.step()  # a step without re-projection
    for name, (layer, _) in stf.layers.items():
        latent, projected = before[name]
        torch.testing.assert_close(layer.weight.detach(), latent + pull * (projected - latent))
        torch.testing.assert_close(layer.projected, projected)


@pytest.mark.parametrize("structure", NAMES)
def test_factors_travel_with_the_model_state(structure: str, tmp_path) -> None:
    """The projections' factors are buffers: a checkpoint of the model restores the warm starts too."""
    net_a, a = wrapped(structure)
    perturb(a)
    a.refresh()
    ds_fields = {"basis", "values", "indices"}
    expected_fields = {"ds": ds_fields, "ds-sparse": ds_fields, "svd": {"left", "right"}, "nm": {"values", "indices"}}
    factor_keys = [key for key in net_a.state_dict() if ".factor_" in key]
    assert {key.rsplit(".factor_", 1)[1] for key in factor_keys} == expected_fields[structure]
    assert {key.rsplit(".factor_", 1)[0] for key in factor_keys} == set(a.layers)
    save_file({k: v.contiguous() for k, v in net_a.state_dict().items()}, str(tmp_path / "model.safetensors"))
    net_b, b = wrapped(structure)
    net_b.load_state_dict(load_file(str(tmp_path / "model.safetensors")))
    for name, (layer, _) in a.layers.items():
        other = b.layers[name][0]
        assert torch.equal(other.projected, layer.projected), name
        for field, tensor in layer.factors.tensors().items():
            assert torch.equal(other.factors.tensors()[field], tensor), (name, field)
    a.refresh()  # the warm starts came along: refreshing both from the same latent weights agrees
    b.refresh()
    for name, (layer, _) in a.layers.items():
        assert torch.equal(b.layers[name][0].projected, layer.projected), name


@pytest.mark.parametrize("model", ["bert", "gpt2"])
@pytest.mark.parametrize("structure", NAMES)
def test_finalize_swaps_in_compact_layers(structure: str, model: str) -> None:
    net, stf = wrapped(structure, model)
    n_layers = len(stf.layers)
    twin = copy.deepcopy(stf)  # the same model and STF, to see what finalize's projection should be
    before = model_output(net)
    report = stf.finalize()
    assert stf.layers == {} and stf_layers(net) == []
    assert len(report.layers) == n_layers
    assert report.model_bytes_before == model_bytes(TINY_MODELS[model]())  # the dense model, not STF's buffers
    compact_cls = STRUCTURES[structure][1]
    for name in default_targets(model):
        layer = net.get_submodule(name)
        assert type(layer) is compact_cls, name
        assert layer.source_kind == ("conv1d" if model == "gpt2" else "linear")
    # documented: finalize projects once more (final_iters rounds) and the compact layers hold that projection
    twin.refresh(iters=twin.schedule.final_iters)
    for name, (layer, _) in twin.layers.items():
        torch.testing.assert_close(net.get_submodule(name).materialize(), layer.projected, atol=1e-6, rtol=0)
    torch.testing.assert_close(model_output(net), model_output(twin.model), atol=1e-5, rtol=0)
    if structure in ("svd", "nm"):  # closed-form projections of unchanged weights: the same output
        torch.testing.assert_close(model_output(net), before, atol=1e-5, rtol=0)


@pytest.mark.parametrize("structure", NAMES)
def test_finalize_after_training_projects_the_latest_weights(structure: str) -> None:
    net, stf = wrapped(structure)
    perturb(stf)  # an optimizer step, with no refresh after it
    latent = {name: layer.weight.detach().clone() for name, (layer, _) in stf.layers.items()}
    stf.finalize()
    for name, w in latent.items():
        compact = net.get_submodule(name).materialize()
        stale = (compact - w).norm() / w.norm()
        assert stale < 1.0, name  # a projection of the new weight, not of the pretrained one
        if structure in ("svd", "nm"):
            (fresh,) = STRUCTURES[structure][0]().fit([w])
            torch.testing.assert_close(compact, fresh.reconstruct(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("structure", NAMES)
def test_finalize_with_zero_iters_keeps_the_last_projection(structure: str) -> None:
    """Documented: ``finalize(iters=0)`` keeps exactly the projection that training evaluated."""
    net, stf = wrapped(structure)
    perturb(stf)  # the latent weights moved since the last projection
    net.eval()
    before = model_output(net)  # evaluation, λ = 1: computes with the last projection
    last = {name: layer.projected.clone() for name, (layer, _) in stf.layers.items()}
    stf.finalize(iters=0)  # zero fitting rounds: keep the warm start, i.e. the last projection
    for name, w in last.items():
        torch.testing.assert_close(net.get_submodule(name).materialize(), w, atol=1e-6, rtol=0)
    torch.testing.assert_close(model_output(net), before, atol=1e-5, rtol=0)
    twin_net, twin = wrapped(structure)
    perturb(twin)
    twin.finalize()  # the default re-projects the moved weights
    assert (model_output(twin_net) - before).abs().max() > 1e-3


@pytest.mark.parametrize(
    ("config", "targets"),
    [
        # feasible for the 128x64 intermediate layer (listed first), infeasible for the 64x64 query
        (DenseSparseConfig(ratio=35), ["encoder.layer.0.intermediate.dense", "encoder.layer.0.attention.self.query"]),
        (DenseSparseConfig(ratio=100), None),
        (LowRankConfig(rank=64), None),
        (NMConfig(n=1, m=128), ["encoder.layer.1.output.dense", "encoder.layer.1.intermediate.dense"]),
        (DenseSparseConfig(ratio=1.0), None),
    ],
    ids=["ds-mixed", "ds-too-high", "svd-full-rank", "nm-mixed", "ratio-1"],
)
def test_infeasible_ratio_raises_before_any_change(config, targets) -> None:
    net = TINY_MODELS["bert"]()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    modules = [type(m) for m in net.modules()]
    with pytest.raises(InfeasibleRatioError):
        STF.wrap(net, config, targets=targets)
    assert [type(m) for m in net.modules()] == modules
    assert stf_layers(net) == []
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())


def test_infeasible_message_gives_the_feasible_range() -> None:
    with pytest.raises(InfeasibleRatioError, match=r"64x64 weight; feasible ratios for this shape are 1 to 32"):
        STF.wrap(TINY_MODELS["bert"](), DenseSparseConfig(ratio=40))


def test_wrap_keeps_bias_and_weight_and_plain_modules() -> None:
    net = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 32, bias=False))
    weights = [linear_weight(net[0]).detach().clone(), linear_weight(net[2]).detach().clone()]
    bias = net[0].bias.detach().clone()
    stf = STF.wrap(net, LowRankConfig(ratio=2), targets=["0", "2"])
    assert isinstance(net[0], STFLinear) and isinstance(net[2], STFLinear)
    assert torch.equal(net[0].weight, weights[0]) and torch.equal(net[2].weight, weights[1])
    assert torch.equal(net[0].bias, bias) and net[2].bias is None
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    y = net(x)
    stf.finalize()
    assert net[2].bias is None
    torch.testing.assert_close(net(x), y, atol=1e-5, rtol=0)
