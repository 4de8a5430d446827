"""AR-ELBO: σ̂² is the batch MSE, its gradient is the fixed-σ² NLL gradient (envelope theorem),
evaluation uses a checkpointed running average, and on two processes σ̂², the gradients and the
running average are those of one process on the whole batch."""

from __future__ import annotations

import multiprocessing

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import distributions as D

import ilvae.decoders
from ilvae.decoders.ar_elbo import ARELBODecoder
from ilvae.errors import ConfigurationError
from ilvae.likelihoods import GaussianAdaptive

B, LATENT, DIM = 7, 4, 16


def _loop_variance(x: torch.Tensor, theta: torch.Tensor, per_dimension: bool) -> torch.Tensor:
    """σ̂² by brute force: SSE/(N·D) or SSE_j/N over all N rows (samples × batch)."""
    rows_x = x.expand_as(theta).reshape(-1, theta.shape[-1]).tolist()
    rows_t = theta.reshape(-1, theta.shape[-1]).tolist()
    sse = [0.0] * theta.shape[-1]
    for row_x, row_t in zip(rows_x, rows_t, strict=True):
        for j, (a, b) in enumerate(zip(row_x, row_t, strict=True)):
            sse[j] += (a - b) ** 2
    n = len(rows_t)
    if per_dimension:
        return torch.tensor([s / n for s in sse], dtype=torch.float64)
    return torch.tensor(sum(sse) / (n * len(sse)), dtype=torch.float64)


def _batch(seed: int, shape: tuple[int, ...] = (B, DIM)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape[-2:], generator=g, dtype=torch.float64)
    theta = torch.randn(shape, generator=g, dtype=torch.float64)
    return x, theta


@pytest.mark.parametrize("per_dimension", [False, True])
@pytest.mark.parametrize("shape", [(B, DIM), (3, B, DIM)])
def test_batch_variance_is_the_batch_mse(per_dimension: bool, shape: tuple[int, ...]) -> None:
    x, theta = _batch(0, shape)
    lik = GaussianAdaptive(DIM, per_dimension=per_dimension).double().train()
    want = _loop_variance(x, theta, per_dimension)
    torch.testing.assert_close(lik.batch_variance(x, theta), want)
    # Training-mode log_prob is the Gaussian log-density at that σ̂², and the first batch sets
    # the running average.
    got = lik.log_prob(x, theta)
    torch.testing.assert_close(got, D.Normal(theta, want.sqrt()).log_prob(x).sum(-1))
    torch.testing.assert_close(lik.running_variance, want)


@pytest.mark.parametrize("per_dimension", [False, True])
def test_gradient_equals_fixed_variance_nll_gradient(per_dimension: bool) -> None:
    torch.manual_seed(0)
    decoder = ARELBODecoder(LATENT, DIM, hidden=[8], per_dimension=per_dimension).double()
    decoder.train()
    params = list(decoder.parameters())
    z = torch.randn(B, LATENT, dtype=torch.float64)
    x = torch.randn(B, DIM, dtype=torch.float64)

    loss = -decoder.log_prob(x, z).mean()
    grads = torch.autograd.grad(loss, params)

    theta = decoder(z)
    fixed = _loop_variance(x, theta.detach(), per_dimension)  # a constant: no gradient
    reference = -D.Normal(theta, fixed.sqrt()).log_prob(x).sum(-1).mean()
    ref_grads = torch.autograd.grad(reference, params, retain_graph=True)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)

    # The check discriminates: σ² = 1 (the usual fixed choice) gives a different gradient.
    unit = -D.Normal(theta, 1.0).log_prob(x).sum(-1).mean()
    unit_grads = torch.autograd.grad(unit, params)
    assert max((g - u).abs().max().item() for g, u in zip(grads, unit_grads, strict=True)) > 1e-2

    # With respect to θ itself: ∂/∂θ_bd of −mean_b log p = (θ_bd − x_bd) / (B σ̂_d²).
    theta_leaf = theta.detach().requires_grad_(True)
    (-decoder.likelihood.log_prob(x, theta_leaf).mean()).backward()
    analytic = (theta_leaf.detach() - x) / (B * fixed)
    torch.testing.assert_close(theta_leaf.grad, analytic, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("per_dimension", [False, True])
def test_running_variance_follows_momentum_by_hand(per_dimension: bool) -> None:
    lik = GaussianAdaptive(2, per_dimension=per_dimension, momentum=0.25).double().train()
    x = torch.zeros(3, 2, dtype=torch.float64)
    for batch_variance, expected in ((2.0, 2.0),  # the first batch sets the average
                                     (4.0, 0.75 * 2.0 + 0.25 * 4.0),  # = 2.5
                                     (1.0, 0.75 * 2.5 + 0.25 * 1.0)):  # = 2.125
        theta = torch.full((3, 2), batch_variance ** 0.5, dtype=torch.float64)
        lik.log_prob(x, theta)
        torch.testing.assert_close(lik.running_variance,
                                   torch.full(lik.running_variance.shape, expected,
                                              dtype=torch.float64))
    assert lik.num_batches.item() == 3
    torch.testing.assert_close(lik.running_variance.mean().item(), 2.125)

    # Evaluation (eval mode, or no autograd) uses the running average and leaves it alone.
    theta = torch.randn(3, 2, dtype=torch.float64)
    lik.eval()
    want = D.Normal(theta, 2.125 ** 0.5).log_prob(x).sum(-1)
    torch.testing.assert_close(lik.log_prob(x, theta), want)
    lik.train()
    with torch.no_grad():
        torch.testing.assert_close(lik.log_prob(x, theta), want)
    assert lik.num_batches.item() == 3
    torch.testing.assert_close(lik.running_variance.mean().item(), 2.125)


def test_no_momentum_keeps_the_cumulative_average() -> None:
    lik = GaussianAdaptive(2, momentum=None).double().train()
    x = torch.zeros(3, 2, dtype=torch.float64)
    for v in (2.0, 4.0, 1.0):
        lik.log_prob(x, torch.full((3, 2), v ** 0.5, dtype=torch.float64))
    torch.testing.assert_close(lik.running_variance.item(), (2.0 + 4.0 + 1.0) / 3)


@pytest.mark.parametrize("per_dimension", [False, True])
def test_checkpoint_round_trip_gives_identical_eval_log_prob(per_dimension: bool) -> None:
    torch.manual_seed(0)
    decoder = ARELBODecoder(LATENT, DIM, hidden=[8], per_dimension=per_dimension, momentum=0.3)
    decoder.train()
    for _ in range(3):
        decoder.log_prob(torch.randn(B, DIM), torch.randn(B, LATENT))
    state = decoder.state_dict()
    assert {"likelihood.running_variance", "likelihood.num_batches"} <= set(state)
    assert not torch.allclose(state["likelihood.running_variance"], torch.ones(()))

    # Rebuilt the way a checkpoint is: from the recorded constructor arguments.
    rebuilt = type(decoder)(**decoder.supplied_args, **decoder.config["init_args"])
    rebuilt.load_state_dict(state)
    decoder.eval()
    rebuilt.eval()
    x, z = torch.randn(B, DIM), torch.randn(B, LATENT)
    with torch.inference_mode():
        assert torch.equal(rebuilt.log_prob(x, z), decoder.log_prob(x, z))
    torch.testing.assert_close(
        decoder.log_prob(x, z).detach(),
        D.Normal(decoder(z), state["likelihood.running_variance"].sqrt()).log_prob(x).sum(-1)
        .detach())


@pytest.mark.parametrize("per_dimension", [False, True])
def test_build_by_registered_name(per_dimension: bool) -> None:
    decoder = ilvae.decoders.build("ar_elbo", latent_dim=4, data_dim=16,
                                   per_dimension=per_dimension)
    assert isinstance(decoder, ARELBODecoder)
    assert isinstance(decoder.likelihood, GaussianAdaptive)
    assert decoder.likelihood.running_variance.shape == ((16,) if per_dimension else ())
    z = torch.randn(3, 4)
    assert decoder(z).shape == (3, 16)
    assert decoder.log_prob(torch.randn(3, 16), z).shape == (3,)


# ----------------------------------------------------------------- two processes (gloo)
def _two_steps(rank: int = 0, world: int = 1) -> dict:
    """Two steps per ``per_dimension`` on batches of N = 12 rows, this process holding rows
    rank, rank + W, …: the gradients of the batch-mean loss and of a row-weighted loss with
    respect to the decoder's parameters, averaged over the W processes (what DDP applies);
    (1/W)·∂ℓ_r/∂θ with respect to given decoder outputs θ (S = 3 samples); the running
    average of σ̂² after these 3 training-mode evaluations per step."""
    result = {}
    for per_dimension in (False, True):
        torch.manual_seed(0)
        decoder = ARELBODecoder(LATENT, DIM, hidden=[8], per_dimension=per_dimension,
                                momentum=0.3).double().train()
        generator = torch.Generator().manual_seed(1)
        steps = []
        for _ in range(2):
            z = torch.randn(12, LATENT, generator=generator, dtype=torch.float64)
            x = torch.randn(12, DIM, generator=generator, dtype=torch.float64) * 2
            theta = torch.randn(3, 12, DIM, generator=generator, dtype=torch.float64)
            mine = slice(rank, None, world)
            loss = -decoder.log_prob(x[mine], z[mine]).mean()
            grads = torch.autograd.grad(loss, list(decoder.parameters()))
            # Rows weighted by w_b: the batch-mean argument of the envelope theorem no longer
            # applies, so the gradient through σ̂² (the backward all-reduce) matters.
            w = torch.linspace(0.5, 1.5, 12, dtype=torch.float64)[mine]
            weighted = -(w * decoder.log_prob(x[mine], z[mine])).mean()
            weighted_grads = torch.autograd.grad(weighted, list(decoder.parameters()))
            for g in (*grads, *weighted_grads) if world > 1 else ():
                dist.all_reduce(g)  # DDP: all-reduce the gradients and divide by W
                g /= world
            leaf = theta[:, mine].clone().requires_grad_(True)
            (-decoder.likelihood.log_prob(x[mine], leaf).mean()).backward()
            theta_grad = leaf.grad / world  # ∂[(1/W) Σ_r ℓ_r]/∂θ_r
            if world > 1:  # gather every process's rows back into the batch order
                parts = [torch.empty_like(theta_grad) for _ in range(world)]
                dist.all_gather(parts, theta_grad.contiguous())
                theta_grad = torch.empty(3, 12, DIM, dtype=torch.float64)
                for r, part in enumerate(parts):
                    theta_grad[:, r::world] = part
            steps.append({"grads": [g.clone() for g in grads], "theta_grad": theta_grad,
                          "weighted_grads": [g.clone() for g in weighted_grads],
                          "x": x, "theta": theta})
        result[per_dimension] = {"steps": steps,
                                 "running": decoder.likelihood.running_variance.clone(),
                                 "num_batches": int(decoder.likelihood.num_batches)}
    return result


def _worker(rank: int, world: int, init: str, out: str) -> None:
    """Process ``rank`` of ``world``: :func:`_two_steps` with σ̂² all-reduced, then two
    controls: each process's own σ̂² (as before the fix), and the global σ̂² through an
    all-reduce without a backward pass; rank 0 saves the three."""
    import ilvae.likelihoods as likelihoods

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    result = {"global": _two_steps(rank, world)}
    likelihoods._distributed = lambda: False  # a forked child: the parent's module is untouched
    result["local"] = _two_steps(rank, world)

    class Detached:  # the global σ̂² without the backward all-reduce
        @staticmethod
        def apply(tensor: torch.Tensor) -> torch.Tensor:
            out = tensor.detach().clone()
            dist.all_reduce(out)
            return out

    likelihoods._distributed, likelihoods._AllReduceSum = (lambda: True), Detached
    result["detached"] = _two_steps(rank, world)
    if rank == 0:
        torch.save(result, out)
    dist.destroy_process_group()


def _run_two_processes(tmp_path) -> dict:
    # Forked from this process, which has imported torch already: a fresh interpreter would
    # spend seconds importing it again.
    context = multiprocessing.get_context("fork")
    out = tmp_path / "two.pt"
    children = [context.Process(target=_worker, args=(r, 2, str(tmp_path / "store"), str(out)))
                for r in range(2)]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=120)
    for child in children:
        if child.is_alive():
            child.kill()
            child.join()
    assert [c.exitcode for c in children] == [0, 0]
    return torch.load(out)


def test_two_processes_give_the_single_process_gradient_and_running_variance(tmp_path):
    """σ̂² is all-reduced (SSE and count) with a backward all-reduce: after DDP's averaging the
    gradients equal those of one process on the whole batch, with no extra factor W."""
    single = _two_steps()
    runs = _run_two_processes(tmp_path)
    close = {"rtol": 1e-10, "atol": 1e-12}

    def gap(a, b):
        return max((u - v).abs().max().item() for u, v in zip(a, b, strict=True))

    for per_dimension in (False, True):
        want, got = single[per_dimension], runs["global"][per_dimension]
        own, detached = runs["local"][per_dimension], runs["detached"][per_dimension]
        for k, step in enumerate(want["steps"]):
            for key in ("grads", "weighted_grads"):
                for g_want, g_got in zip(step[key], got["steps"][k][key], strict=True):
                    torch.testing.assert_close(g_got, g_want, **close)
            torch.testing.assert_close(got["steps"][k]["theta_grad"], step["theta_grad"],
                                       **close)
            # Closed form: ∂/∂θ_sbd of the mean over S·N = 3·12 rows is (θ − x)/(3·12·σ̂²),
            # σ̂² of all rows.
            theta, x = step["theta"], step["x"]
            var = _loop_variance(x, theta, per_dimension)
            torch.testing.assert_close(got["steps"][k]["theta_grad"],
                                       (theta - x) / (3 * 12 * var), **close)
            # Controls (the comparison can fail): each process's own σ̂² changes both
            # gradients; the global σ̂² without the backward all-reduce still gives the
            # batch-mean gradient (envelope theorem) but not the row-weighted one.
            assert gap(own["steps"][k]["grads"], step["grads"]) > 1e-3
            assert gap(detached["steps"][k]["grads"], step["grads"]) < 1e-10
            assert gap(detached["steps"][k]["weighted_grads"], step["weighted_grads"]) > 1e-3
        torch.testing.assert_close(got["running"], want["running"], rtol=1e-12, atol=0)
        assert got["num_batches"] == want["num_batches"] == 6
        assert not torch.allclose(own["running"], want["running"], rtol=1e-6)


# -- σ-VAE (Rybkin et al., ICML 2021) ----------------------------------------------------------
def _sigma_vae_loss(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """σ-VAE's batch loss with the optimal shared σ*² = MSE over batch and data dimensions,
    written out from the paper (gradient through σ*): mean over the batch of
    Σ_d [(x − x̂)²/(2σ*²) + ln σ* + ½ ln 2π]."""
    mse = ((x - x_hat) ** 2).mean()
    nll = (x - x_hat) ** 2 / (2 * mse) + 0.5 * torch.log(mse) + 0.5 * np.log(2 * np.pi)
    return nll.sum(-1).mean()


def test_isotropic_training_variance_is_sigma_vaes_optimal_variance() -> None:
    torch.manual_seed(4)
    decoder = ARELBODecoder(LATENT, DIM, hidden=[8]).double().train()
    z, x = torch.randn(B, LATENT, dtype=torch.float64), torch.rand(B, DIM, dtype=torch.float64)
    theta = decoder(z)
    sigma_star_sq = float(np.mean((x.numpy() - theta.detach().numpy()) ** 2))  # σ-VAE's σ*²
    loss = -decoder.log_prob(x, z).mean()
    assert float(decoder.likelihood.running_variance) == pytest.approx(sigma_star_sq, rel=1e-12)
    # Same value and same gradient as σ-VAE's loss.
    grads = torch.autograd.grad(loss, list(decoder.parameters()))
    ref = _sigma_vae_loss(x, decoder(z))
    ref_grads = torch.autograd.grad(ref, list(decoder.parameters()))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_eval_variance_batch_recomputes_sigma_star_on_the_evaluated_batch() -> None:
    torch.manual_seed(5)
    decoder = ARELBODecoder(LATENT, DIM, hidden=[8], eval_variance="batch").double()
    running = ARELBODecoder(LATENT, DIM, hidden=[8]).double()
    running.load_state_dict(decoder.state_dict())
    z, x = torch.randn(B, LATENT, dtype=torch.float64), torch.rand(B, DIM, dtype=torch.float64)
    for dec in (decoder, running):
        dec.train().log_prob(x, z)  # one training batch sets the running variance
        dec.eval()
    z2, x2 = torch.randn(B, LATENT, dtype=torch.float64), torch.rand(B, DIM, dtype=torch.float64)
    with torch.inference_mode():
        theta = decoder(z2)
        sigma_star = ((x2 - theta) ** 2).mean().sqrt()
        torch.testing.assert_close(decoder.log_prob(x2, z2),
                                   D.Normal(theta, sigma_star).log_prob(x2).sum(-1))
        stored = running.likelihood.running_variance.sqrt()
        torch.testing.assert_close(running.log_prob(x2, z2),
                                   D.Normal(theta, stored).log_prob(x2).sum(-1))
    assert abs(float(sigma_star) - float(stored)) > 1e-3  # the two readings differ here
    assert decoder.likelihood.num_batches == 1  # evaluation leaves the running average alone


def test_bad_eval_variance_is_refused_in_one_line() -> None:
    with pytest.raises(ConfigurationError, match=r"^eval_variance='last' is not allowed"):
        ARELBODecoder(LATENT, DIM, eval_variance="last")
