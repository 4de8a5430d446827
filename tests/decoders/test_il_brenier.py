"""ILBrenierDecoder: ‖f(z) − f(z′)‖ ≥ L‖z − z′‖ holds for random and trained weights and is
attained, the explicit gradients train exactly like the double-backward construction, L can be
changed during training, and the configuration is validated and round-trips."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import ilvae.decoders
from ilvae.decoders.il_brenier import ILBrenierDecoder

LATENT, DATA, HIDDEN = 4, 12, [16, 16]
BETAS = ["padding", "random", "trainable"]
RANGE = (0.5, 2.0)  # singular values of the trainable β; the guarantee uses 0.5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Small float64 problems: extra threads only add contention on a shared machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _decoder(L=1.0, beta="padding", activation="leaky_relu", seed=0, dtype=torch.float64, **kw):
    """A decoder with random weights that make both ICNNs contribute visibly (float64 so that
    the ratios of close pairs are not dominated by rounding, see ``_pairs``)."""
    torch.manual_seed(seed)
    dec = ILBrenierDecoder(LATENT, DATA, L=L, hidden=HIDDEN, activation=activation, beta=beta,
                           beta_singular_values=RANGE, **kw).to(dtype)
    with torch.no_grad():
        for psi in (dec.psi1, dec.psi2):
            psi.linear_weight.normal_()
            for block in psi.input_weight:
                block.mul_(3)
            for v in psi.raw_weight:
                v.add_(2 * torch.randn_like(v))
        if beta == "trainable":
            dec.beta_u.normal_()
            dec.beta_v.normal_()
            dec.beta_s.normal_(0, 3)
    return dec


def _pairs(n: int = 2400, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Far pairs, close pairs (z′ = z + 1e-4·δ) and pairs at scales from 1e-3 to 10.

    Close pairs are where a violation of the bound would show (the ratio tends to a
    directional derivative), and where float32 rounding of f (≈1e-7·‖f‖) would be of the same
    order as ‖f(z) − f(z′)‖ itself: hence float64.
    """
    g = torch.Generator().manual_seed(seed)
    z = 2 * torch.randn(n, LATENT, generator=g, dtype=torch.float64)
    third = n // 3
    far = 2 * torch.randn(third, LATENT, generator=g, dtype=torch.float64)
    close = z[third:2 * third] + 1e-4 * torch.randn(third, LATENT, generator=g,
                                                    dtype=torch.float64)
    scales = torch.logspace(-3, 1, n - 2 * third, dtype=torch.float64).unsqueeze(1)
    mixed = z[2 * third:] + scales * torch.randn(n - 2 * third, LATENT, generator=g,
                                                 dtype=torch.float64)
    return z, torch.cat([far, close, mixed])


def _ratios(dec: ILBrenierDecoder, seed: int = 0) -> torch.Tensor:
    z, zp = _pairs(seed=seed)
    with torch.no_grad():
        return (dec(z) - dec(zp)).norm(dim=1) / (z - zp).norm(dim=1)


def _train(dec: ILBrenierDecoder, steps: int = 20, seed: int = 1) -> ILBrenierDecoder:
    """Adam steps on a Bernoulli loss with random data; checks every parameter moved."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(64, DATA, generator=g, dtype=torch.float64).round()
    z = torch.randn(64, LATENT, generator=g, dtype=torch.float64)
    before = {n: p.detach().clone() for n, p in dec.named_parameters()}
    opt = torch.optim.Adam(dec.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        (-dec.log_prob(x, z).mean()).backward()
        opt.step()
    for n, p in dec.named_parameters():
        assert float((p.detach() - before[n]).abs().max()) > 1e-3, n
    return dec


def _reference(dec: ILBrenierDecoder, z: torch.Tensor) -> torch.Tensor:
    """f(z) = g₂(β g₁(z)) built the way the authors' code does: ∇ψ by autograd with
    ``create_graph=True`` (a double backward when trained)."""
    u = z.detach().clone().requires_grad_()
    (g1,) = torch.autograd.grad(dec.psi1(u).sum(), u, create_graph=True)
    v = g1 + dec.L1 * u
    x = v @ dec.beta_matrix().t()
    (g2,) = torch.autograd.grad(dec.psi2(x).sum(), x, create_graph=True)
    return g2 + dec.L2 * x


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("L", [0.5, 1.0, 2.0])
def test_inverse_lipschitz_bound_holds_for_random_and_trained_weights(beta, L):
    dec = _decoder(L, beta)
    assert dec.L >= L and dec.L == pytest.approx(L, rel=1e-6)
    ratios = _ratios(dec)
    assert float(ratios.min()) >= L * (1 - 1e-9)
    assert float(ratios.max()) > 1.5 * L  # the ICNNs are not negligible in this test
    _train(dec)
    assert float(_ratios(dec, seed=1).min()) >= L * (1 - 1e-9)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("activation", ["leaky_relu", "softplus"])
def test_jacobian_singular_values_are_at_least_L(beta, activation):
    # The infinitesimal form of the bound, from autograd's Jacobian of the decoder.
    L = 1.5
    dec = _decoder(L, beta, activation)
    for z in 2 * torch.randn(10, LATENT, dtype=torch.float64):
        jac = torch.autograd.functional.jacobian(lambda t: dec(t[None])[0], z)
        assert jac.shape == (DATA, LATENT)
        assert float(torch.linalg.svdvals(jac).min()) >= L * (1 - 1e-9)


@pytest.mark.parametrize("beta", BETAS)
def test_each_brenier_map_is_strongly_monotone(beta):
    # ⟨g_i(u) − g_i(u′), u − u′⟩ ≥ L_i‖u − u′‖², the property the bound is built from.
    dec = _decoder(2.0, beta)
    z, zp = _pairs()
    L1, L2 = float(dec.L1), float(dec.L2)
    with torch.no_grad():
        g1, g1p = dec.psi1.gradient(z, L1), dec.psi1.gradient(zp, L1)
        assert float(((g1 - g1p) * (z - zp)).sum(1).div((z - zp).pow(2).sum(1)).min()) >= L1 * (
            1 - 1e-9)
        beta_m = dec.beta_matrix()
        u, up = g1 @ beta_m.t(), g1p @ beta_m.t()
        g2, g2p = dec.psi2.gradient(u, L2), dec.psi2.gradient(up, L2)
        assert float(((g2 - g2p) * (u - up)).sum(1).div((u - up).pow(2).sum(1)).min()) >= L2 * (
            1 - 1e-9)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("L", [0.5, 2.0])
def test_bound_is_attained_when_the_potentials_are_flat(beta, L):
    # With w_K → 0 each ∇ψ_i is the constant c_i, f is affine with slope L1·L2·β and, with β's
    # singular values all at their lower end, ‖f(z) − f(z′)‖ = L‖z − z′‖ exactly: the split of L
    # is not looser than promised.
    dec = _decoder(L, beta)
    with torch.no_grad():
        for psi in (dec.psi1, dec.psi2):
            psi.raw_weight[-1].fill_(-200.0)
        if beta == "trainable":
            dec.beta_s.fill_(-200.0)
    ratios = _ratios(dec)
    # The random isometry is stored in float32: its singular values lie within ~1e-7 of 1.
    rtol = 1e-6 if beta == "random" else 1e-9
    assert float(ratios.min()) >= dec.L * (1 - 1e-9)
    torch.testing.assert_close(ratios, torch.full_like(ratios, dec.L), rtol=rtol, atol=0)
    assert dec.L == pytest.approx(L, rel=1e-6)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("activation", ["leaky_relu", "softplus"])
def test_output_and_parameter_gradients_match_double_backward_reference(beta, activation):
    dec = _decoder(1.3, beta, activation)
    g = torch.Generator().manual_seed(2)
    z = torch.randn(32, LATENT, generator=g, dtype=torch.float64)
    x = torch.rand(32, DATA, generator=g, dtype=torch.float64).round()
    params = [p for _, p in dec.named_parameters()]

    ref = _reference(dec, z)
    expected = torch.autograd.grad(F.binary_cross_entropy_with_logits(ref, x), params)

    out = dec(z)
    torch.testing.assert_close(out, ref.detach(), atol=1e-10, rtol=1e-10)
    F.binary_cross_entropy_with_logits(out, x).backward()  # one ordinary backward
    for (name, p), e in zip(dec.named_parameters(), expected, strict=True):
        assert p.grad is not None and float(p.grad.abs().max()) > 0, name
        torch.testing.assert_close(p.grad, e, atol=1e-10, rtol=1e-8, msg=name)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("activation", ["leaky_relu", "softplus"])
def test_inference_mode_and_autocast_give_identical_output(beta, activation):
    dec = _decoder(1.0, beta, activation, dtype=torch.float32)
    z = torch.randn(64, LATENT)
    out = dec(z)
    with torch.inference_mode():
        assert torch.equal(dec(z), out)
    with torch.no_grad():
        assert torch.equal(dec(z), out)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = dec(z)
    assert mixed.dtype == torch.float32 and torch.equal(mixed, out)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        from_bf16 = dec(z.bfloat16())
    assert torch.equal(from_bf16, dec(z.bfloat16().float()))


@pytest.mark.parametrize("beta", BETAS)
def test_setting_L_keeps_the_guarantee_and_is_checkpointed(beta):
    dec = _decoder(1.0, beta)
    dec.L = 3.0
    s_min = {"padding": 1.0, "random": dec.s_min, "trainable": RANGE[0]}[beta]
    assert dec.L >= 3.0 and dec.L == pytest.approx(3.0, rel=1e-6)
    assert float(dec.L1) == pytest.approx(math.sqrt(3.0 / s_min), rel=1e-6)
    assert float(dec.L2) == pytest.approx(math.sqrt(3.0 / s_min), rel=1e-6)
    assert float(_ratios(dec).min()) >= 3.0 * (1 - 1e-9)

    state = dec.state_dict()
    assert {"L1", "L2"} <= set(state)
    fresh = ILBrenierDecoder(LATENT, DATA, L=1.0, hidden=HIDDEN, beta=beta,
                             beta_singular_values=RANGE).double()
    fresh.load_state_dict(state)
    assert fresh.L == dec.L
    z = torch.randn(8, LATENT, dtype=torch.float64)
    assert torch.equal(fresh(z), dec(z))


def test_setting_L_keeps_the_ratio_of_explicit_factors():
    dec = _decoder(0.5, L1=2.0, L2=0.25)
    assert (float(dec.L1), float(dec.L2)) == (2.0, 0.25)
    dec.L = 2.0
    assert float(dec.L1) == pytest.approx(4.0) and float(dec.L2) == pytest.approx(0.5)
    assert float(_ratios(dec).min()) >= 2.0 * (1 - 1e-9)


@pytest.mark.parametrize("beta", BETAS)
def test_L_zero_is_lidvae(beta):
    dec = _decoder(0.0, beta)
    assert dec.L == 0.0 and float(dec.L1) == 0.0 and float(dec.L2) == 0.0
    z = torch.randn(16, LATENT, dtype=torch.float64)
    # LIDVAE: f(z) = ∇ψ₂(β∇ψ₁(z)), no identity terms.
    torch.testing.assert_close(dec(z), _reference(dec, z).detach(), atol=1e-10, rtol=1e-10)
    dec.L = 2.0  # annealing away from 0 splits evenly
    assert float(dec.L1) == pytest.approx(float(dec.L2))
    assert float(_ratios(dec).min()) >= 2.0 * (1 - 1e-9)
    dec.L = 0
    assert dec.L == 0.0


def test_explicit_factors():
    dec = ILBrenierDecoder(LATENT, DATA, L=3.0, L1=2.0, hidden=[8])
    assert float(dec.L2) == pytest.approx(1.5) and dec.L == pytest.approx(3.0)
    dec = ILBrenierDecoder(LATENT, DATA, L=3.0, L2=2.0, hidden=[8], beta="trainable",
                           beta_singular_values=(0.5, 1.0))
    assert float(dec.L1) == pytest.approx(3.0) and dec.L == pytest.approx(3.0)
    dec = ILBrenierDecoder(LATENT, DATA, L=2.25, L1=1.5, L2=1.5, hidden=[8])
    assert dec.L == pytest.approx(2.25)


def test_trainable_beta_singular_values_stay_in_range():
    dec = _decoder(1.0, "trainable")
    for seed in range(5):
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in (dec.beta_u, dec.beta_v, dec.beta_s):
                p.normal_(0, 10)
            s = torch.linalg.svdvals(dec.beta_matrix())
        assert s.shape == (LATENT,)
        assert float(s.min()) >= RANGE[0] * (1 - 1e-12) and float(s.max()) <= RANGE[1] * (
            1 + 1e-12)
    padding = _decoder(1.0, "padding")
    assert torch.equal(padding.beta_matrix(), torch.eye(DATA, LATENT, dtype=torch.float64))


def test_fixed_is_the_earlier_name_of_padding():
    # Configs and checkpoints written with beta="fixed" rebuild the same decoder.
    torch.manual_seed(0)
    old = ILBrenierDecoder(LATENT, DATA, hidden=[8], beta="fixed")
    torch.manual_seed(0)
    new = ILBrenierDecoder(LATENT, DATA, hidden=[8], beta="padding")
    assert old.beta == "padding" and old.state_dict().keys() == new.state_dict().keys()
    z = torch.randn(6, LATENT)
    assert torch.equal(old(z), new(z))


def test_random_beta_is_a_seeded_isometry_spread_over_every_data_dimension():
    torch.manual_seed(1)
    a = ILBrenierDecoder(LATENT, 200, hidden=[8], beta="random", beta_seed=3)
    torch.manual_seed(2)
    b = ILBrenierDecoder(LATENT, 200, hidden=[8], beta="random", beta_seed=3)
    c = ILBrenierDecoder(LATENT, 200, hidden=[8], beta="random", beta_seed=4)
    beta = a.beta_matrix().double()
    # Orthonormal columns (QR in float64, stored in float32) and the s_min the guarantee uses.
    torch.testing.assert_close(beta.t() @ beta, torch.eye(LATENT, dtype=torch.float64),
                               atol=1e-6, rtol=0)
    assert a.s_min <= float(torch.linalg.svdvals(beta).min()) and a.s_min > 1 - 1e-6
    # Fixed by beta_seed alone, not by the global random state; kept in the state dict.
    assert torch.equal(a.beta_matrix(), b.beta_matrix())
    assert not torch.equal(a.beta_matrix(), c.beta_matrix())
    assert "beta_isometry" in a.state_dict()
    assert not any(p is a.beta_isometry for p in a.parameters())
    # Unlike the zero-padding, every data dimension receives the latent.
    assert bool((beta.abs().sum(1) > 0).all())


def test_square_decoder_data_dim_equal_to_latent_dim():
    dec = ILBrenierDecoder(LATENT, LATENT, L=1.0, hidden=[8]).double()
    z, zp = _pairs()
    with torch.no_grad():
        ratios = (dec(z) - dec(zp)).norm(dim=1) / (z - zp).norm(dim=1)
    assert float(ratios.min()) >= 1 - 1e-9


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"L": -1.0}, "L"),
        ({"L": float("nan")}, "L"),
        ({"L": float("inf")}, "L"),
        ({"L1": -0.5}, "L1"),
        ({"L2": float("inf")}, "L2"),
        ({"L1": 2.0, "L2": 2.0}, "L"),  # L=1 but L1·L2·s_min = 4
        ({"L1": 0.0}, "L1"),  # cannot reach L=1
        ({"beta": "learned"}, "beta"),
        ({"activation": "relu"}, "activation"),
        ({"beta_singular_values": (0.0, 1.0)}, "beta_singular_values"),
        ({"beta_singular_values": (2.0, 1.0)}, "beta_singular_values"),
        ({"beta_singular_values": (1.0,)}, "beta_singular_values"),
        ({"hidden": []}, "hidden"),
    ],
)
def test_bad_configuration_raises_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        ILBrenierDecoder(LATENT, DATA, **{"hidden": [8], **kwargs})


def test_data_dim_smaller_than_latent_dim_raises():
    with pytest.raises(ValueError, match=r"\bdata_dim\b"):
        ILBrenierDecoder(8, 4)


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf")])
def test_setting_a_bad_L_raises(value):
    dec = ILBrenierDecoder(LATENT, DATA, hidden=[8])
    with pytest.raises(ValueError, match=r"\bL\b"):
        dec.L = value
    assert dec.L == pytest.approx(1.0)


@pytest.mark.parametrize("beta", BETAS)
def test_registry_build_and_config_round_trip(beta):
    dec = ilvae.decoders.build("il_brenier", latent_dim=8, data_dim=64, L=1.5, beta=beta,
                               hidden=[32])
    assert type(dec) is ILBrenierDecoder and dec.L == pytest.approx(1.5)
    default = ilvae.decoders.build("il_brenier", latent_dim=8, data_dim=64, L=1.5)
    assert isinstance(default, ILBrenierDecoder) and default.hidden == [512]
    config = dec.config
    assert config["class_path"] == "ilvae.decoders.il_brenier.ILBrenierDecoder"
    rebuilt = type(dec)(8, 64, **config["init_args"])
    rebuilt.load_state_dict(dec.state_dict())
    z = torch.randn(5, 8)
    assert torch.equal(rebuilt(z), dec(z))
    assert rebuilt.log_prob(torch.rand(5, 64).round(), z).shape == (5,)


@pytest.mark.parametrize("beta", BETAS)
def test_leading_batch_dimensions_decode_like_a_flat_batch(beta):
    # e.g. K importance samples of B latents, (K, B, m) → (K, B, D)
    dec = _decoder(1.0, beta)
    z = torch.randn(3, 5, LATENT, dtype=torch.float64)
    out = dec(z)
    assert out.shape == (3, 5, DATA)
    assert torch.equal(out.reshape(15, DATA), dec(z.reshape(15, LATENT)))


@pytest.mark.parametrize(("dtype", "nominal"), [(torch.float16, 1.5), (torch.bfloat16, 1.49)])
def test_casting_to_a_half_type_keeps_the_guaranteed_L_at_or_above_nominal(dtype, nominal):
    dec = ILBrenierDecoder(4, 16, L=nominal, hidden=[8])
    # Rounded to nearest in the half type, √nominal goes down: a plain cast would undercut L.
    half_factor = float(torch.tensor(float(dec.L1), dtype=torch.float64).to(dtype))
    assert half_factor**2 < nominal
    cast = dec.to(dtype)
    assert cast.psi1.bias.dtype == dtype and cast.L1.dtype == torch.float32
    assert float(cast.L1) * float(cast.L2) * cast.s_min >= nominal and cast.L >= nominal


def test_a_cast_back_to_float32_keeps_the_inverse_lipschitz_property():
    nominal = 1.5
    dec = ILBrenierDecoder(4, 16, L=nominal, hidden=[8]).double()
    dec.L = 1.1  # stored rounded up in float64
    dec = dec.half().float()
    assert dec.L1.dtype == torch.float32 and dec.L >= 1.1
    g = torch.Generator().manual_seed(0)
    z, w = torch.randn(2, 256, 4, generator=g)
    with torch.no_grad():
        ratio = (dec(z) - dec(w)).norm(dim=1) / (z - w).norm(dim=1)
    assert float(ratio.min()) >= 1.1 * (1 - 1e-5)
