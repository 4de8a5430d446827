"""LipschitzDecoder: ‖f(z) − f(z′)‖ ≤ K‖z − z′‖ holds, is close to attained, and is configurable."""

from __future__ import annotations

import math

import pytest
import torch

import ilvae.decoders
from ilvae.decoders.lipschitz import LipschitzDecoder, SpectralLinear, gram_spectral_bound

LATENT, DATA = 4, 16


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Small float64 problems: extra threads only add contention on a shared machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _pairs(n: int = 2400, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Far pairs, close pairs (1e-4 apart) and pairs at a wide range of scales."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, LATENT, generator=g, dtype=torch.float64)
    third = n // 3
    far = torch.randn(third, LATENT, generator=g, dtype=torch.float64)
    close = z[third:2 * third] + 1e-4 * torch.randn(third, LATENT, generator=g,
                                                    dtype=torch.float64)
    scales = torch.logspace(-3, 1, n - 2 * third, dtype=torch.float64).unsqueeze(1)
    mixed = z[2 * third:] + scales * torch.randn(n - 2 * third, LATENT, generator=g,
                                                 dtype=torch.float64)
    return z, torch.cat([far, close, mixed])


def _max_ratio(decoder: LipschitzDecoder, seed: int = 0) -> float:
    z, zp = _pairs(seed=seed)
    with torch.no_grad():
        ratio = (decoder(z) - decoder(zp)).norm(dim=1) / (z - zp).norm(dim=1)
    return ratio.max().item()


def _stretch(decoder: LipschitzDecoder, steps: int = 20, seed: int = 1) -> None:
    """Adam steps that *maximise* the mean stretch ratio: the hardest training for the bound."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(decoder.parameters(), lr=1e-2)
    for _ in range(steps):
        z = torch.randn(256, LATENT, generator=g, dtype=torch.float64)
        zp = torch.randn(256, LATENT, generator=g, dtype=torch.float64)
        loss = -((decoder(z) - decoder(zp)).norm(dim=1) / (z - zp).norm(dim=1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _decoder(K: float, activation: str = "relu", hidden: list[int] | None = None,
             seed: int = 0) -> LipschitzDecoder:
    torch.manual_seed(seed)
    return LipschitzDecoder(LATENT, DATA, K=K, hidden=[64, 64] if hidden is None else hidden,
                            activation=activation).double()


@pytest.mark.parametrize("K", [0.3, 2.0, 25.0])
@pytest.mark.parametrize("activation,hidden", [("relu", [64, 64]), ("tanh", [64, 64]),
                                               ("maxmin", [64, 64]), ("relu", [])])
def test_ratio_never_exceeds_K_random_and_trained(K: float, activation: str,
                                                  hidden: list[int]) -> None:
    # The single-layer case is the sharpest: its stretch reaches ‖W‖₂/σ̄ · K, so even a slight
    # underestimate of σ (as one power iteration gives) shows up as a ratio above K.
    decoder = _decoder(K, activation, hidden)
    assert _max_ratio(decoder) <= K * (1 + 1e-9)
    _stretch(decoder)
    trained = _max_ratio(decoder, seed=2)
    assert trained <= K * (1 + 1e-9)
    # Non-vacuous: training that pushes the stretch up gets close to the bound but not past it.
    assert trained >= 0.75 * K


def test_linear_decoder_attains_K_exactly() -> None:
    # With no hidden layer f(z) = K W z / σ̄(W) + b: the bound is attained along the top right
    # singular vector, so any slack in the certificate would show here.
    decoder = _decoder(3.0, hidden=[])
    decoder.net[0].weight.data.copy_(torch.randn(DATA, LATENT, dtype=torch.float64))
    decoder.net[0].refresh()
    v = torch.linalg.svd(decoder.net[0].weight.detach())[2][0]
    z = torch.randn(5, LATENT, dtype=torch.float64)
    with torch.no_grad():
        ratio = (decoder(z + 0.1 * v) - decoder(z)).norm(dim=1) / 0.1
    torch.testing.assert_close(ratio, torch.full_like(ratio, 3.0), rtol=1e-9, atol=0)
    assert _max_ratio(decoder) <= 3.0 * (1 + 1e-9)


@pytest.mark.parametrize("shape", [(64, 4), (16, 64), (50, 50), (784, 512)])
def test_gram_bound_is_certified_and_tight(shape: tuple[int, int]) -> None:
    torch.manual_seed(0)
    weights = [torch.nn.Linear(shape[1], shape[0]).weight.detach(),
               torch.linalg.qr(torch.randn(max(shape), min(shape)))[0],  # flat spectrum
               torch.randn(shape) * torch.logspace(0, -3, shape[1])]  # decaying spectrum
    for w in weights:
        exact = torch.linalg.svdvals(w.double())[0]
        bound, v = gram_spectral_bound(w, iterations=6)
        assert bound >= exact
        assert bound <= exact * 1.005
        assert abs(torch.linalg.vector_norm(v).item() - 1) < 1e-12


def test_cached_bound_follows_every_optimizer_step() -> None:
    decoder = _decoder(1.0)
    opt = torch.optim.Adam(decoder.parameters(), lr=5e-2)
    for _ in range(5):
        decoder(torch.randn(8, LATENT, dtype=torch.float64)).pow(2).sum().neg().backward()
        opt.step()
        opt.zero_grad()
        for layer in decoder.net:
            if isinstance(layer, SpectralLinear):
                exact = torch.linalg.matrix_norm(layer.weight.detach(), ord=2)
                assert layer.sigma_bound >= exact
                assert torch.linalg.matrix_norm(layer.normalized_weight().detach(), 2) <= 1


def test_gradient_matches_exact_spectral_normalisation() -> None:
    torch.manual_seed(0)
    layer = SpectralLinear(6, 10).double()
    # A clear gap σ₂/σ₁ = 2/3 so that the top singular pair, hence ∂σ₁/∂W, is well defined.
    u = torch.linalg.qr(torch.randn(10, 6, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))[0]
    s = torch.tensor([3.0, 2.0, 1.5, 1.0, 0.5, 0.2], dtype=torch.float64)
    layer.weight.data.copy_(u @ torch.diag(s) @ v.T)
    layer.refresh()
    x = torch.randn(7, 6, dtype=torch.float64)
    r = torch.randn(7, 10, dtype=torch.float64)
    (layer(x) * r).sum().backward()
    w = layer.weight.detach().clone().requires_grad_(True)
    ((x @ (w / torch.linalg.matrix_norm(w, ord=2)).T + layer.bias.detach()) * r).sum().backward()
    torch.testing.assert_close(layer.weight.grad, w.grad, rtol=1e-7, atol=1e-10)


def test_inference_mode_matches_normal_mode() -> None:
    decoder = _decoder(2.0)
    _stretch(decoder, steps=3)
    z = torch.randn(32, LATENT, dtype=torch.float64)
    decoder.train()
    train_out = decoder(z)
    decoder.eval()
    with torch.inference_mode():
        inference_out = decoder(z)
    normal_out = decoder(z)
    assert torch.equal(inference_out, normal_out.detach())
    assert torch.equal(train_out.detach(), normal_out.detach())
    # A cache filled under inference mode must not break training afterwards.
    fresh = _decoder(2.0, seed=3)
    with torch.inference_mode():
        fresh(z)
    fresh.train()
    fresh(z).sum().backward()
    assert all(p.grad is not None for p in fresh.parameters())


def test_K_is_saved_and_restored() -> None:
    decoder = _decoder(2.5)
    assert "_K" in decoder.state_dict()
    other = _decoder(1.0, seed=4)
    other.load_state_dict(decoder.state_dict())
    assert other.K.item() == 2.5
    z = torch.randn(4, LATENT, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(other(z), decoder(z))
    assert decoder.config["init_args"]["K"] == 2.5


def test_setting_K_rescales_the_output_and_keeps_the_graph() -> None:
    decoder = _decoder(2.5)
    z = torch.randn(4, LATENT, dtype=torch.float64)
    out = decoder(z)
    decoder.K = 0.5  # e.g. a schedule stepping between forward and backward
    out.sum().backward()
    assert decoder.K.item() == 0.5
    with torch.no_grad():
        torch.testing.assert_close(decoder(z), out.detach() * 0.5 / 2.5)


def test_build_by_registered_name() -> None:
    decoder = ilvae.decoders.build("lipschitz", latent_dim=4, data_dim=16, K=2.0)
    assert isinstance(decoder, LipschitzDecoder)
    assert decoder.K.item() == 2.0
    assert decoder(torch.randn(3, 4)).shape == (3, 16)


@pytest.mark.parametrize("K", [0, -1.0, math.nan, math.inf, "two", None, True])
def test_bad_K_is_rejected_naming_the_field(K: object) -> None:
    pattern = r"^K=.* is not allowed: expected a finite number > 0$"
    with pytest.raises(ValueError, match=pattern):
        LipschitzDecoder(LATENT, DATA, K=K)
    decoder = LipschitzDecoder(LATENT, DATA, hidden=[8])
    with pytest.raises(ValueError, match=pattern):
        decoder.K = K


@pytest.mark.parametrize("activation", ["gelu", "silu", "nope"])
def test_non_lipschitz_activation_is_rejected(activation: str) -> None:
    with pytest.raises(ValueError, match=r"activation=.*relu.*maxmin"):
        LipschitzDecoder(LATENT, DATA, activation=activation)


@pytest.mark.parametrize("gram_iterations", [-1, 2.5, True])
def test_bad_gram_iterations_is_rejected(gram_iterations: object) -> None:
    with pytest.raises(ValueError, match="gram_iterations"):
        LipschitzDecoder(LATENT, DATA, gram_iterations=gram_iterations)


def test_maxmin_needs_even_widths() -> None:
    with pytest.raises(ValueError, match="hidden"):
        LipschitzDecoder(LATENT, DATA, hidden=[7], activation="maxmin")
