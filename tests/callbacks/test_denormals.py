"""FlushDenormals: subnormal floats count as zero on the CPU while fitting, and only then."""

import threading

import lightning as L
import pytest
import torch

from ilvae.callbacks import FlushDenormals
from ilvae.callbacks.denormals import _openmp_library, flush_denormal_enabled, on_every_thread
from ilvae.cli import main
from ilvae.errors import ConfigurationError
from tests.test_cli import QUICKSTART, _fit

SMALLEST_NORMAL = torch.finfo(torch.float32).tiny  # 1.1755e-38

pytestmark = pytest.mark.skipif(not torch.set_flush_denormal(False),
                                reason="this CPU has no flush-to-zero mode")


@pytest.fixture(autouse=True)
def _mode_off():
    torch.set_flush_denormal(False)
    yield
    torch.set_flush_denormal(False)


def _decayed_moment(steps: int) -> float:
    """Adam's first moment of a parameter with gradient 1 once and 0 afterwards: 0.1·0.9^(t−1)
    in closed form, subnormal in float32 after about 830 steps."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([p], lr=1e-3)
    for t in range(steps):
        p.grad = torch.ones(1) if t == 0 else torch.zeros(1)
        opt.step()
    return float(opt.state[p]["exp_avg"][0])


def test_the_mode_is_read_back_from_an_actual_subnormal_product():
    assert not flush_denormal_enabled()
    assert float(torch.tensor([1e-39]) * 1.0) == pytest.approx(1e-39, rel=1e-3)
    torch.set_flush_denormal(True)
    assert flush_denormal_enabled()
    assert float(torch.tensor([1e-39]) * 1.0) == 0.0


def test_without_flushing_adam_state_becomes_subnormal_with_flushing_it_is_zero():
    steps = 900
    expected = 0.1 * 0.9 ** (steps - 1)  # 8.9e-43
    assert 0 < expected < SMALLEST_NORMAL
    kept = _decayed_moment(steps)
    assert 0 < kept < SMALLEST_NORMAL
    assert kept == pytest.approx(expected, rel=0.05)  # subnormals carry few digits
    torch.set_flush_denormal(True)
    assert _decayed_moment(steps) == 0.0
    # a normal value is untouched
    assert _decayed_moment(100) == pytest.approx(0.1 * 0.9 ** 99, rel=1e-5)


def _thread_modes() -> dict[int, bool]:
    modes = {}

    def probe():
        modes[threading.get_ident()] = flush_denormal_enabled()

    assert on_every_thread(probe)
    return modes


def test_every_intra_op_thread_flushes_during_fit_and_none_after():
    """The mode is a per-thread flag: torch.set_flush_denormal alone leaves the intra-op
    threads (where matrix products run) as they were."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.randn(512, 512) @ torch.randn(512, 512)  # the pool exists before the switch
        # scikit-learn loads its own OpenMP runtime beside torch's: torch's must be picked
        from sklearn.utils import _openmp_helpers  # noqa: F401
        if _openmp_library() is None:
            pytest.skip("torch's OpenMP runtime is not reachable here")
        torch.set_flush_denormal(True)
        modes = _thread_modes()
        assert len(modes) == 2 and sorted(modes.values()) == [False, True]  # main thread only
        torch.set_flush_denormal(False)
        callback = FlushDenormals()
        callback.setup(None, None, "fit")
        assert list(_thread_modes().values()) == [True, True]
        callback.teardown(None, None, "fit")
        assert list(_thread_modes().values()) == [False, False]
    finally:
        torch.set_num_threads(threads)


class _Probe(L.Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append(flush_denormal_enabled())


def test_fit_flushes_while_training_and_restores_the_mode_afterwards(tmp_path):
    cli = _fit(tmp_path / "on", "--trainer.callbacks+=tests.callbacks.test_denormals._Probe")
    probe = next(c for c in cli.trainer.callbacks if isinstance(c, _Probe))
    assert probe.seen and all(probe.seen)
    assert any(isinstance(c, FlushDenormals) for c in cli.trainer.callbacks)
    assert not flush_denormal_enabled()  # restored
    cli = _fit(tmp_path / "off", "--denormals.flush=false",
               "--trainer.callbacks+=tests.callbacks.test_denormals._Probe")
    probe = next(c for c in cli.trainer.callbacks if isinstance(c, _Probe))
    assert probe.seen and not any(probe.seen)


def test_a_mode_switched_on_before_fit_stays_on(tmp_path):
    torch.set_flush_denormal(True)
    _fit(tmp_path)
    assert flush_denormal_enabled()


def test_the_mode_is_restored_when_training_fails(tmp_path):
    callback = FlushDenormals()
    callback.setup(None, None, "fit")
    assert flush_denormal_enabled()
    callback.on_exception(None, None, RuntimeError("boom"))
    assert not flush_denormal_enabled()
    callback.setup(None, None, "validate")  # only fitting switches it on
    assert not flush_denormal_enabled()


def test_a_non_boolean_setting_is_refused(tmp_path, capsys):
    with pytest.raises(ConfigurationError, match="flush='yes' is not allowed"):
        FlushDenormals(flush="yes")
    code = main(["fit", "--config", QUICKSTART, f"--trainer.default_root_dir={tmp_path}",
                 "--denormals.flush=maybe"])
    assert code == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("ilvae: error")]
    assert len(err) == 1 and "denormals.flush" in err[0]
    assert not any(tmp_path.iterdir())  # refused before anything was written
