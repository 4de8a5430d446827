"""Two CPU processes (gloo), each updating with part of the data: the synchronised compute()
of every metric equals the single-process result on all the data."""

import datetime
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributions import Normal

from ilvae.decoders.mlp import MLPDecoder
from ilvae.encoders import MLPEncoder
from ilvae.metrics import (
    ActiveUnits,
    ClusterAccuracy,
    EpsilonCollapse,
    ImportanceWeightedNLL,
    KLPerDimension,
    MutualInformation,
    RelativeFisherDivergence,
)
from ilvae.priors import StandardNormal

N, SPLIT, D, M, SIGMA = 40, 23, 5, 2, 0.5


class StandIn(nn.Module):
    """The model interface the metrics use: encode, decoder, prior, latent_dim."""

    def __init__(self, encoder: MLPEncoder, decoder: nn.Module, prior: StandardNormal) -> None:
        super().__init__()
        self.encoder, self.decoder, self.prior = encoder, decoder, prior
        self.latent_dim = prior.latent_dim

    def encode(self, x: torch.Tensor) -> Normal:
        return self.encoder(x)


def _linear_gaussian(exact_posterior: bool) -> StandIn:
    """f(z) = Wz + b with orthogonal columns of W. The encoder is the exact (diagonal)
    posterior, which makes every importance weight equal p(x), or a fixed linear map with scale
    ≈ 1e-12, which makes z = μ(x); both make the sampling metrics deterministic."""
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(D, M, generator=g))
    weight, bias = q * torch.tensor([1.5, 0.7]), torch.randn(D, generator=g)
    decoder = MLPDecoder(M, D, hidden=[], likelihood="gaussian", sigma=SIGMA)
    decoder.L = 0.7
    encoder = MLPEncoder((D,), M, hidden=[], min_scale=1e-4 if exact_posterior else 1e-12)
    with torch.no_grad():
        decoder.net[0].weight.copy_(weight)
        decoder.net[0].bias.copy_(bias)
        layer = encoder.net[0]
        layer.weight.zero_()
        layer.bias.zero_()
        if exact_posterior:
            cov = torch.diag(1.0 / (1.0 + (weight**2).sum(0) / SIGMA**2))
            gain = cov @ weight.T / SIGMA**2
            layer.weight[:M].copy_(gain)
            layer.bias[:M].copy_(-gain @ bias)
            layer.bias[M:].copy_(torch.log(torch.expm1(cov.diagonal().sqrt() - 1e-4)))
        else:
            layer.weight[:M].copy_(0.3 * torch.randn(M, D, generator=g))
            layer.bias[M:].fill_(-60.0)
    return StandIn(encoder, decoder, StandardNormal(M))


def _data():
    g = torch.Generator().manual_seed(1)
    posterior = Normal(torch.randn(N, 3, generator=g) * torch.tensor([0.02, 0.3, 1.0]),
                       0.2 + torch.rand(N, 3, generator=g))
    x = 1.5 * torch.randn(N, D, generator=g)
    clusters = torch.randint(0, 3, (N,), generator=g)
    labels = torch.randint(0, 3, (N,), generator=g)
    return posterior, x, clusters, labels


def _metrics(**kwargs):
    return {
        "kl": KLPerDimension(**kwargs),
        "active_units": ActiveUnits(threshold=0.05, **kwargs),
        "mutual_info": MutualInformation(num_samples=3, chunk_size=16, **kwargs),
        "epsilon_collapsed": EpsilonCollapse(eps=0.05, delta=0.1, **kwargs),
        "iw_nll": ImportanceWeightedNLL(num_samples=6, chunk_size=4, **kwargs),
        "relative_fisher": RelativeFisherDivergence(**kwargs),
        "cluster_accuracy": ClusterAccuracy(3, **kwargs),
    }


def _update(metrics, posterior, x, clusters, labels, exact, tiny):
    for name, metric in metrics.items():
        if name == "iw_nll":
            metric.update(x, exact)
        elif name == "relative_fisher":
            metric.update(x, tiny)
        elif name == "cluster_accuracy":
            metric.update(clusters, labels)
        else:
            metric.update(posterior)


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=60))
    try:
        posterior, x, clusters, labels = _data()
        exact, tiny = _linear_gaussian(True), _linear_gaussian(False)
        part = slice(0, SPLIT) if rank == 0 else slice(SPLIT, N)
        synced = _metrics()
        _update(synced, Normal(posterior.loc[part], posterior.scale[part]), x[part],
                clusters[part], labels[part], exact, tiny)
        reference = _metrics(sync_on_compute=False)
        _update(reference, posterior, x, clusters, labels, exact, tiny)
        results = {name: (synced[name].compute(), reference[name].compute())
                   for name in synced}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _idle_rank_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """Rank 0 updates with all the data, rank 1 with none: the per-dimension metrics, built
    with ``latent_dim``, hold (m,) states on both ranks, so both take the same collective path
    and compute the single-process result."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=60))
    try:
        posterior = _data()[0]
        m = posterior.loc.shape[1]
        synced = _per_dimension_metrics(latent_dim=m)
        shapes = {name: {key: tuple(value.shape) for key, value in metric.metric_state.items()}
                  for name, metric in synced.items()}
        if rank == 0:
            for metric in synced.values():
                metric.update(posterior)
        reference = _per_dimension_metrics(sync_on_compute=False)
        for metric in reference.values():
            metric.update(posterior)
        results = {name: (synced[name].compute(), reference[name].compute())
                   for name in synced}
        torch.save({"results": results, "shapes": shapes}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _per_dimension_metrics(**kwargs):
    return {"kl": KLPerDimension(**kwargs),
            "active_units": ActiveUnits(threshold=0.05, **kwargs),
            "epsilon_collapsed": EpsilonCollapse(eps=0.05, delta=0.1, **kwargs)}


# Spawned processes unpickle the worker by module name. Whatever the pytest import mode, they
# import this file by its stem from its own directory (prepended to sys.path at spawn time).
_MODULE = Path(__file__).stem
_worker.__module__ = _MODULE
_idle_rank_worker.__module__ = _MODULE


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _flatten(value):
    if isinstance(value, dict):
        return {key: value[key] for key in sorted(value)}
    return {"value": value}


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_synced_compute_equals_single_process_result_for_every_metric(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    monkeypatch.setitem(sys.modules, _MODULE, sys.modules[__name__])
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert set(ranks[0]) == set(_metrics())
    for name in ranks[0]:
        for rank in ranks:
            synced, reference = (_flatten(v) for v in rank[name])
            assert synced.keys() == reference.keys()
            for key in synced:
                torch.testing.assert_close(synced[key], reference[key], rtol=1e-5, atol=1e-6,
                                           equal_nan=True, msg=f"{name}/{key}")
    # Sanity: the data exercise non-trivial values.
    reference = {name: _flatten(value[1]) for name, value in ranks[0].items()}
    assert 0 < int(reference["active_units"]["value"]) < 3
    assert float(reference["mutual_info"]["value"]) > 0.1
    assert not torch.isnan(reference["relative_fisher"]["relative_fisher_bound"])


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_a_rank_without_batches_synchronises_per_dimension_metrics(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    monkeypatch.setitem(sys.modules, _MODULE, sys.modules[__name__])
    mp.spawn(_idle_rank_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for rank in ranks:
        for name, states in rank["shapes"].items():
            assert all(shape in ((), (3,)) for shape in states.values()), name
            assert (3,) in states.values(), name  # per-dimension states have their shape
        for name, (synced, reference) in rank["results"].items():
            synced, reference = _flatten(synced), _flatten(reference)
            for key in synced:
                torch.testing.assert_close(synced[key], reference[key], rtol=1e-12, atol=0.0,
                                           msg=f"{name}/{key}")


def test_latent_dim_gives_final_state_shapes_and_refuses_another_width():
    for metric in _per_dimension_metrics(latent_dim=3).values():
        assert {tuple(v.shape) for v in metric.metric_state.values()} == {(), (3,)}
        with pytest.raises(ValueError, match="latent_dim=3"):
            metric.update(Normal(torch.zeros(2, 4), torch.ones(2, 4)))
    with pytest.raises(ValueError, match="latent_dim=0 is not allowed"):
        KLPerDimension(latent_dim=0)
