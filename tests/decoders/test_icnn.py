"""ICNN: the explicit gradient equals autograd's (plain, zero-padded and lifted inputs), ψ is
convex before and after training, and evaluation is identical under inference mode."""

from __future__ import annotations

import math

import pytest
import torch

from ilvae.decoders.icnn import ICNN
from ilvae.errors import ConfigurationError

N, M = 12, 4
DEPTHS = [[16], [16, 8], [8, 12, 8]]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Small problems: extra threads only add contention on a shared machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _icnn(hidden, activation, seed=0, lift_dim=None, dtype=torch.float32) -> ICNN:
    torch.manual_seed(seed)
    psi = ICNN(N, hidden, activation, lift_dim=lift_dim).to(dtype)
    with torch.no_grad():
        # A non-zero linear term and larger weights than at initialisation, so every layer
        # contributes visibly to ∇ψ.
        psi.linear_weight.normal_()
        for v in psi.raw_weight:
            v.add_(torch.randn_like(v))
    return psi


def _autograd_gradient(psi: ICNN, u: torch.Tensor) -> torch.Tensor:
    u = u.detach().requires_grad_()
    (grad,) = torch.autograd.grad(psi(u).sum(), u)
    return grad


def _train(psi: ICNN, steps: int = 20, seed: int = 1) -> ICNN:
    """A few Adam steps fitting ∇ψ to a random map (large lr, so the weights really move)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(64, N, generator=g, dtype=psi.bias.dtype)
    target = 3 * torch.randn(64, N, generator=g, dtype=psi.bias.dtype)
    opt = torch.optim.Adam(psi.parameters(), lr=0.05)
    before = [p.detach().clone() for p in psi.parameters()]
    for _ in range(steps):
        opt.zero_grad()
        ((psi.gradient(u) - target) ** 2).sum().backward()
        opt.step()
    moved = [float((p.detach() - b).abs().max()) for p, b in zip(psi.parameters(), before,
                                                                 strict=True)]
    assert min(moved) > 1e-3, "training did not change every parameter"
    return psi


@pytest.mark.parametrize("activation", ["leaky_relu", "softplus"])
@pytest.mark.parametrize("hidden", DEPTHS, ids=["depth1", "depth2", "depth3"])
def test_explicit_gradient_equals_autograd(activation, hidden):
    psi = _icnn(hidden, activation)
    u = 2 * torch.randn(256, N)
    expected = _autograd_gradient(psi, u)
    torch.testing.assert_close(psi.gradient(u), expected, atol=1e-5, rtol=1e-5)
    # The strongly convex version: gradient of ψ(u) + (L/2)‖u‖².
    torch.testing.assert_close(psi.gradient(u, L=0.7), expected + 0.7 * u, atol=1e-5, rtol=1e-5)
    assert float(expected.abs().max()) > 0.5  # not a trivially small gradient


@pytest.mark.parametrize("activation", ["leaky_relu", "softplus"])
@pytest.mark.parametrize("hidden", DEPTHS, ids=["depth1", "depth2", "depth3"])
@pytest.mark.parametrize("lift", ["padding", "matrix"])
@pytest.mark.parametrize("lift_dim", [None, M], ids=["one_block", "split_blocks"])
def test_lifted_gradient_equals_autograd_on_materialised_input(activation, hidden, lift,
                                                               lift_dim):
    psi = _icnn(hidden, activation, lift_dim=lift_dim)
    g = torch.Generator().manual_seed(3)
    v = 2 * torch.randn(128, M, generator=g)
    if lift == "padding":
        beta, u = None, torch.cat([v, torch.zeros(128, N - M)], dim=1)
    else:
        beta = torch.randn(N, M, generator=g)
        u = v @ beta.t()
    expected = _autograd_gradient(psi, u)
    torch.testing.assert_close(psi.lifted_gradient(v, beta), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(psi.lifted_gradient(v, beta, L=1.3), expected + 1.3 * u,
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(psi.lifted_potential(v, beta), psi(u), atol=1e-5, rtol=1e-5)


def test_lifted_gradient_with_other_widths_than_lift_dim():
    # A potential split at lift_dim=M still takes zero-padded inputs of any width ≤ N.
    psi = _icnn([16, 8], "leaky_relu", lift_dim=M)
    v = torch.randn(32, M + 3)
    u = torch.cat([v, torch.zeros(32, N - M - 3)], dim=1)
    torch.testing.assert_close(psi.lifted_gradient(v, L=0.5),
                               _autograd_gradient(psi, u) + 0.5 * u, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("activation", ["leaky_relu", "softplus"])
def test_explicit_gradient_after_training_equals_autograd(activation):
    psi = _train(_icnn([16, 8], activation))
    u = 2 * torch.randn(128, N)
    torch.testing.assert_close(psi.gradient(u), _autograd_gradient(psi, u), atol=1e-5,
                               rtol=1e-5)


def _midpoint_gap(psi: ICNN, seed: int = 0) -> torch.Tensor:
    """(ψ(u) + ψ(v))/2 − ψ((u+v)/2) over 4,000 pairs at scales from 1e-3 to 10."""
    g = torch.Generator().manual_seed(seed)
    u = 3 * torch.randn(4000, N, generator=g, dtype=torch.float64)
    scales = torch.logspace(-3, 1, 4000, dtype=torch.float64).unsqueeze(1)
    v = u + scales * torch.randn(4000, N, generator=g, dtype=torch.float64)
    with torch.no_grad():
        return (psi(u) + psi(v)) / 2 - psi((u + v) / 2)


@pytest.mark.parametrize("activation", ["leaky_relu", "softplus"])
def test_potential_is_convex_before_and_after_training(activation):
    # float64: the gap of close pairs is ~ scale² and would drown in float32 rounding of ψ.
    psi = _icnn([16, 16, 16], activation, dtype=torch.float64)
    gap = _midpoint_gap(psi)
    assert float(gap.min()) >= -1e-12
    assert float(gap.max()) > 1e-3  # strictly convex somewhere: the test can fail
    _train(psi)
    assert all(bool((w >= 0).all()) for w in psi.weights)
    assert float(_midpoint_gap(psi, seed=1).min()) >= -1e-12


@pytest.mark.parametrize("activation", ["leaky_relu", "softplus"])
def test_hessian_of_potential_is_symmetric_psd_and_matches_jacobian_of_gradient(activation):
    psi = _icnn([8, 8], activation, dtype=torch.float64)
    for u in 2 * torch.randn(5, N, dtype=torch.float64):
        hessian = torch.autograd.functional.hessian(lambda x: psi(x), u)
        jacobian = torch.autograd.functional.jacobian(lambda x: psi.gradient(x), u)
        torch.testing.assert_close(jacobian, hessian, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(hessian, hessian.t(), atol=1e-10, rtol=0)
        assert float(torch.linalg.eigvalsh(hessian).min()) >= -1e-10


def _by_hand(psi: ICNN, u: torch.Tensor, sign: float = 1.0) -> torch.Tensor:
    """ψ(u) = wᵀa(sign·W₀ a(A₀u + b₀)² + A₁u + b₁) + cᵀu, written out from the layer formulas."""
    act = torch.nn.functional.softplus
    if psi.activation == "leaky_relu":
        act = lambda x: torch.nn.functional.leaky_relu(x, 0.2)  # noqa: E731
    A, b, h = psi.input_matrix(), psi.bias, psi.hidden[0]
    W0, w = [torch.nn.functional.softplus(v) for v in psi.raw_weight]
    h0 = act(u @ A[:h].t() + b[:h]) ** 2
    h1 = act(sign * h0 @ W0.t() + u @ A[h:].t() + b[h:])
    return h1 @ w[0] + u @ psi.linear_weight


@pytest.mark.parametrize("activation", ["leaky_relu", "softplus"])
def test_potential_matches_layer_formulas_and_midpoint_test_can_fail(activation):
    psi = _icnn([16, 8], activation, dtype=torch.float64)
    u = 2 * torch.randn(2000, N, dtype=torch.float64)
    v = u + torch.randn(2000, N, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(psi(u), _by_hand(psi, u), atol=1e-12, rtol=0)
        # Control: with a negative W₀ the same midpoint test reports non-convexity.
        gap = (_by_hand(psi, u, -1) + _by_hand(psi, v, -1)) / 2 - _by_hand(psi, (u + v) / 2, -1)
    assert float(gap.min()) < -1e-3


@pytest.mark.parametrize("activation", ["leaky_relu", "softplus"])
def test_inference_mode_gives_identical_output(activation):
    psi = _icnn([16, 8], activation, lift_dim=M)
    v = torch.randn(64, M)
    beta = torch.randn(N, M)
    u = torch.randn(64, N)
    normal = (psi.gradient(u), psi.lifted_gradient(v, None, 0.5),
              psi.lifted_gradient(v, beta, 0.5), psi.lifted_potential(v, beta))
    with torch.inference_mode():
        inference = (psi.gradient(u), psi.lifted_gradient(v, None, 0.5),
                     psi.lifted_gradient(v, beta, 0.5), psi.lifted_potential(v, beta))
    for a, b in zip(normal, inference, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("output_init, divisor", [("unit", lambda n: 1.0),
                                                  ("sqrt_fan_in", math.sqrt),
                                                  ("fan_in", lambda n: float(n))])
def test_weights_are_nonnegative_and_initialised_to_their_rule(output_init, divisor):
    # Hidden-to-hidden weights have mean 1/fan_in; the output weights mean 1/divisor(fan_in).
    # Each mean is over ≥ 256 draws of U(0.1, 1.9) (sd 0.52): within 0.15 is > 4 sd.
    torch.manual_seed(0)
    psi = ICNN(N, [64, 32, 256], output_init=output_init)
    fans = [64, 32, 256]
    for k, (w, fan_in) in enumerate(zip(psi.weights, fans, strict=True)):
        w = w.detach()
        assert bool((w > 0).all())
        scale = fan_in if k < len(fans) - 1 else divisor(fan_in)
        assert abs(float(w.mean()) * scale - 1.0) < 0.15


def test_unknown_output_init_is_one_line_naming_the_field():
    with pytest.raises(ConfigurationError, match=r"^output_init='big' is not allowed: expected "
                                                 r"one of unit, sqrt_fan_in, fan_in$"):
        ICNN(N, [8], output_init="big")


def test_deep_network_stays_well_scaled_at_initialisation():
    # With W ≈ 1/fan_in the positive drift per layer stays bounded: ψ and ∇ψ of a deep net are
    # of the same order as those of a shallow one.
    torch.manual_seed(0)
    u = torch.randn(256, N)
    shallow = ICNN(N, [64])
    deep = ICNN(N, [64] * 8)
    with torch.no_grad():
        for f in (lambda p: p(u), lambda p: p.gradient(u)):
            ratio = float(f(deep).abs().mean() / f(shallow).abs().mean())
            assert 0.1 < ratio < 10


def test_every_parameter_gets_a_gradient_from_one_backward():
    psi = _icnn([16, 8], "softplus", lift_dim=M)
    v = torch.randn(32, M)
    loss = psi.lifted_gradient(v, None, 0.3).pow(2).sum()
    loss.backward()  # no create_graph anywhere
    for name, p in psi.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"hidden": []}, "hidden"),
        ({"hidden": [8, 0]}, "hidden"),
        ({"activation": "relu6"}, "activation"),
        ({"negative_slope": -0.1}, "negative_slope"),
        ({"lift_dim": N + 1}, "lift_dim"),
    ],
)
def test_bad_configuration_raises_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        ICNN(N, **{"hidden": [8], **kwargs})


def test_bad_lift_raises():
    psi = ICNN(N, [8])
    with pytest.raises(ValueError, match="beta must have shape"):
        psi.lifted_gradient(torch.randn(3, M), torch.randn(N, M + 1))
    with pytest.raises(ValueError, match="does not fit"):
        psi.lifted_gradient(torch.randn(3, N + 1))
