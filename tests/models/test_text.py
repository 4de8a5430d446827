"""TextVAE: the loss and the importance-weighted NLL equal independent per-sentence loops, the
perplexity follows its formula, the Brenier output term is L-inverse-Lipschitz while the
decoder's recurrence ignores z, and training on sentences of a random HMM learns them."""

import inspect
import json
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from ilvae.datamodules.text import BOS, EOS, PAD, UNK, TextDataModule, Vocabulary
from ilvae.errors import CheckpointError, ConfigurationError, NonFiniteLossError
from ilvae.metrics.text_nll import TextNLL
from ilvae.models.text import TextVAE

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[2]
INJECTIONS = ["standard", "brenier"]


class _HMM:
    """A random HMM over words w0 … w{S·W−1}: state s emits one of its own W words from a random
    distribution, moves to a random successor with probability 0.9 (uniformly elsewhere
    otherwise), and after every word the sentence ends with probability ``stop`` (always after
    ``max_words``)."""

    def __init__(self, seed=0, num_states=8, words_per_state=5, stop=0.2, max_words=10):
        rng = np.random.default_rng(seed)
        self.S, self.W, self.stop, self.max_words = num_states, words_per_state, stop, max_words
        self.transition = np.full((num_states, num_states), 0.1 / (num_states - 1))
        self.transition[np.arange(num_states), rng.permutation(num_states)] = 0.9
        self.emission = rng.dirichlet(np.full(words_per_state, 2.0), size=num_states)

    def sample(self, n, seed):
        rng = np.random.default_rng(seed)
        sentences = []
        for _ in range(n):
            state, words = rng.integers(self.S), []
            while not words or (len(words) < self.max_words and rng.random() > self.stop):
                words.append(f"w{state * self.W + rng.choice(self.W, p=self.emission[state])}")
                state = rng.choice(self.S, p=self.transition[state])
            sentences.append(words)
        return sentences

    def log_prob(self, words):
        """Exact log p(sentence) by the forward algorithm."""
        alpha, total = np.full(self.S, 1.0 / self.S), 0.0
        for k, word in enumerate(words):
            if k:
                alpha = alpha @ self.transition * (1 - self.stop)
            index = int(word[1:])
            state, w = divmod(index, self.W)
            emit = np.zeros(self.S)
            emit[state] = self.emission[state, w]
            alpha = alpha * emit
            norm = alpha.sum()
            total, alpha = total + math.log(norm), alpha / norm
        return total + (math.log(self.stop) if len(words) < self.max_words else 0.0)


def _tokens(sentences, vocab, max_length=12):
    tokens = torch.full((len(sentences), max_length), PAD)
    for i, words in enumerate(sentences):
        ids = vocab.encode(words[: max_length - 1]) + [EOS]
        tokens[i, : len(ids)] = torch.tensor(ids)
    return tokens


def _corpus(n=40, seed=1, max_length=12):
    sentences = _HMM().sample(n, seed)
    vocab = Vocabulary.build(sentences)
    return _tokens(sentences, vocab, max_length), vocab


def _model(vocab_size, z_injection="standard", max_length=12, **kw):
    torch.manual_seed(0)
    args = dict(latent_dim=3, embedding_dim=8, hidden_dim=12, brenier_hidden=[10],
                num_iw_samples=10, iw_chunk_size=4) | kw
    return TextVAE(data_shape=(max_length,), vocab_size=vocab_size, z_injection=z_injection,
                   **args)


def _lstm_step(lstm, x, h, c):
    gates = lstm.weight_ih_l0 @ x + lstm.bias_ih_l0 + lstm.weight_hh_l0 @ h + lstm.bias_hh_l0
    i, f, g, o = gates.chunk(4)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def _reference_log_px(model, row, z):
    """log p(x|z) of one sentence by an explicit loop over its tokens: LSTM cell equations from
    the weights, <bos> first, log-softmax over the non-special classes, stop after <eos>."""
    dec = model.decoder
    hidden = dec.lstm.hidden_size
    if dec.z_injection == "standard":
        c = dec.init_state.weight @ z + dec.init_state.bias
        h = torch.tanh(c)
    else:
        h = c = z.new_zeros(hidden)
    total, previous = z.new_zeros(()), BOS
    for token in row.tolist():
        if token == PAD:
            break
        x = dec.embedding.weight[previous]
        if dec.z_injection == "standard":
            x = torch.cat([x, z])
        h, c = _lstm_step(dec.lstm, x, h, c)
        logits = dec.output.weight @ h + dec.output.bias
        if dec.z_injection == "brenier":
            logits = logits + torch.cat([z.new_zeros(1), dec.brenier(z[None])[0]])
        # Class c of the output layer is token id c + 2 (<pad> and <bos> are never predicted).
        total = total + torch.log_softmax(logits, 0)[token - 2]
        previous = token
    return total


def _log_normal(z, loc, scale):
    return (-0.5 * ((z - loc) / scale) ** 2 - torch.log(scale) - 0.5 * math.log(2 * math.pi)).sum()


# ------------------------------------------------------------------------------------ loss
@pytest.mark.filterwarnings("ignore:You are trying to `self.log")
@pytest.mark.parametrize("z_injection", INJECTIONS)
def test_loss_equals_per_sentence_loop_of_log_softmax_gathers(z_injection):
    tokens, vocab = _corpus(6)
    model = _model(len(vocab), z_injection, beta=0.7)
    torch.manual_seed(3)
    out = model(tokens)
    torch.manual_seed(3)
    posterior = model.encode(tokens)
    z = posterior.rsample()
    log_px = torch.stack([_reference_log_px(model, row, zi)
                          for row, zi in zip(tokens, z, strict=True)])
    kl = kl_divergence(posterior, Normal(torch.zeros(3), torch.ones(3))).sum(1)
    assert torch.allclose(out["log_px"], log_px, atol=1e-5)
    torch.manual_seed(3)
    loss = model._step((tokens, (tokens != PAD).sum(1)), "val")
    assert torch.allclose(loss, (-log_px + 0.7 * kl).mean(), atol=1e-5)


def test_encode_returns_normal_over_the_latent():
    tokens, vocab = _corpus(5)
    posterior = _model(len(vocab)).encode(tokens)
    assert isinstance(posterior, Normal) and posterior.loc.shape == (5, 3)
    assert bool((posterior.scale > 0).all())


def test_encoder_ignores_the_pads_after_a_sentence():
    tokens, vocab = _corpus(4, max_length=12)
    model = _model(len(vocab), max_length=12)
    longer = torch.cat([tokens, torch.full((4, 5), PAD)], dim=1)
    assert torch.allclose(model.encode(tokens).loc, model.encode(longer).loc, atol=1e-6)


# --------------------------------------------------------------------------- IW-NLL / ppl
@pytest.mark.parametrize("z_injection", INJECTIONS)
def test_iw_nll_equals_brute_force_loop_over_examples_and_samples(z_injection):
    tokens, vocab = _corpus(5)
    model = _model(len(vocab), z_injection).double()
    k_total, chunk = 11, 4
    torch.manual_seed(7)
    nll = model.iw_nll(tokens, k_total, chunk)
    # The same draws: one posterior.sample((k,)) per chunk, in order.
    torch.manual_seed(7)
    posterior = model.encode(tokens)
    z = torch.cat([posterior.sample((min(chunk, k_total - s),))
                   for s in range(0, k_total, chunk)])
    with torch.no_grad():
        for b in range(len(tokens)):
            log_w = []
            for k in range(k_total):
                zk = z[k, b]
                log_w.append(_reference_log_px(model, tokens[b], zk)
                              + _log_normal(zk, torch.zeros(3), torch.ones(3))
                              - _log_normal(zk, posterior.loc[b], posterior.scale[b]))
            expected = math.log(k_total) - torch.logsumexp(torch.stack(log_w), 0)
            assert abs(float(nll[b]) - float(expected)) < 1e-5


def test_iw_nll_decreases_with_k_and_stays_below_negative_elbo():
    tokens, vocab = _corpus(8)
    model = _model(len(vocab), "standard")
    torch.manual_seed(0)
    with torch.no_grad():
        posterior = model.encode(tokens)
        z = posterior.sample((400,))
        log_px = model.decoder.log_prob(tokens, z)  # (400, B)
        negative_elbo = -(log_px.mean(0) - model.prior.kl(posterior).sum(1))  # (B,)
        estimates = {k: torch.stack([model.iw_nll(tokens, k, 50) for _ in range(30)])
                     for k in (1, 10, 100)}
    mean = {k: v.mean(0) for k, v in estimates.items()}
    se = (estimates[1].var(0) / 30 + log_px.double().var(0) / 400).sqrt()
    # K = 1 is an unbiased estimate of −ELBO; larger K can only tighten the bound.
    assert bool((mean[1] - negative_elbo).abs().le(5 * se + 1e-3).all())
    assert bool((mean[10] <= mean[1] + 1e-3).all()) and bool((mean[100] <= mean[10] + 1e-2).all())
    assert bool((mean[100] <= negative_elbo).all())
    assert float((negative_elbo - mean[100]).mean()) > 0.05


def test_perplexity_is_exp_of_total_nll_over_words_plus_eos():
    metric = TextNLL()
    tokens = torch.tensor([[5, 6, 7, EOS, PAD], [8, EOS, PAD, PAD, PAD]])
    metric.update(torch.tensor([9.0, 4.0]), tokens)
    metric.update(torch.tensor([2.5]), torch.tensor([[EOS, PAD, PAD, PAD, PAD]]))
    out = metric.compute()
    # Tokens counted: 3 words + <eos>, 1 word + <eos>, just <eos>: 7; <bos> and pads are not.
    assert math.isclose(float(out["ppl"]), math.exp(15.5 / 7), rel_tol=1e-12)
    assert math.isclose(float(out["iw_nll"]), 15.5 / 3, rel_tol=1e-12)


def test_validation_logs_iw_nll_and_ppl_of_the_validation_sentences(tmp_path):
    sentences = _HMM().sample(30, seed=4)
    path = tmp_path / "corpus.txt"
    path.write_text("".join(" ".join(s) + "\n" for s in sentences))
    dm = TextDataModule(str(path), max_length=12, val_fraction=0.3, batch_size=4)
    model = _model(dm.vocab_size, "brenier", num_iw_samples=5)
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, default_root_dir=tmp_path)
    metrics = trainer.validate(model, dm, verbose=False)[0]
    val_tokens = dm.tensors("val")[0]
    words_plus_eos = sum(len(s.split()) + 1 for s in dm.decode(val_tokens))
    total_nll = metrics["val/iw_nll"] * len(val_tokens)
    assert math.isclose(metrics["val/ppl"], math.exp(total_nll / words_plus_eos), rel_tol=1e-5)
    assert {"val/loss", "val/recon", "val/kl", "val/elbo"} <= set(metrics)
    assert metrics["val/iw_nll"] <= -metrics["val/elbo"] + 1.0


# -------------------------------------------------------------------- Brenier injection
def _ratios(f, z1, z2):
    return (f(z1) - f(z2)).norm(dim=-1) / (z1 - z2).norm(dim=-1)


@pytest.mark.parametrize("L_value", [0.5, 2.0])
def test_brenier_output_term_is_L_inverse_lipschitz_for_random_and_trained_weights(L_value):
    tokens, vocab = _corpus(32)
    model = _model(len(vocab), "brenier", L=L_value)
    torch.manual_seed(1)
    z1, z2 = torch.randn(2, 2000, 3) * 2
    near = z1 + 1e-3 * torch.randn_like(z1)
    term = model.decoder.output_term
    with torch.no_grad():
        assert bool((term(z1)[:, 0] == 0).all())  # the reference (<eos>) class is pinned at 0
        for z_a, z_b in ((z1, z2), (z1, near)):
            assert float(_ratios(term, z_a, z_b).min()) >= L_value * (1 - 1e-4)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    for _ in range(15):
        loss = -model(tokens)["log_px"].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        for z_a, z_b in ((z1, z2), (z1, near)):
            assert float(_ratios(term, z_a, z_b).min()) >= L_value * (1 - 1e-4)
        # Softmax ignores shifts of all logits; modulo them the constant is still ≥ L/√C.
        centred = lambda z: term(z) - term(z).mean(-1, keepdim=True)  # noqa: E731
        bound = L_value / math.sqrt(model.decoder.num_classes)
        assert float(_ratios(centred, z1, z2).min()) >= bound * (1 - 1e-4)


def test_brenier_recurrence_does_not_depend_on_z():
    tokens, vocab = _corpus(4)
    model = _model(len(vocab), "brenier")
    z1, z2 = torch.randn(2, 4, 3)
    diff = model.decoder(tokens, z1) - model.decoder(tokens, z2)
    # Only the output-layer term moves with z: the same shift at every position.
    expected = model.decoder.output_term(z1) - model.decoder.output_term(z2)
    assert torch.allclose(diff, expected[:, None, :].expand_as(diff), atol=1e-5)
    # Gradients: the LSTM states get none from z, and ∂logits_t/∂z is the same for every t.
    z = z1.clone().requires_grad_(True)
    states = []
    hook = model.decoder.lstm.register_forward_hook(lambda m, i, o: states.append(o[0]))
    logits = model.decoder(tokens, z)
    hook.remove()
    assert torch.autograd.grad(states[0].sum(), z, allow_unused=True, retain_graph=True)[0] \
        is None
    grads = [torch.autograd.grad(logits[:, t, 3].sum(), z, retain_graph=True)[0]
             for t in range(tokens.shape[1])]
    for g in grads[1:]:
        assert torch.allclose(g, grads[0])
    # In the standard decoder the recurrence does depend on z (the check above can fail).
    standard = _model(len(vocab), "standard")
    diff = standard.decoder(tokens, z1) - standard.decoder(tokens, z2)
    assert not torch.allclose(diff[:, 0], diff[:, 3], atol=1e-3)


def test_annealing_callbacks_can_set_L_only_with_the_brenier_decoder():
    _, vocab = _corpus(4)
    brenier = _model(len(vocab), "brenier", L=1.0)
    brenier.decoder.L = 3.0
    assert math.isclose(brenier.decoder.L, 3.0, rel_tol=1e-6)
    assert not hasattr(_model(len(vocab), "standard").decoder, "L")


# ------------------------------------------------------------------------------ training
def test_word_dropout_replaces_words_only_and_never_the_likelihood_targets():
    tokens, vocab = _corpus(40)
    model = _model(len(vocab), word_dropout=0.5)
    torch.manual_seed(0)
    dropped = model.drop_words(tokens)
    kept = (tokens == PAD) | (tokens == EOS)
    assert torch.equal(dropped[kept], tokens[kept])
    changed = dropped != tokens
    assert bool((dropped[changed] == UNK).all())
    rate = changed.sum() / ((~kept) & (tokens != UNK)).sum()
    assert 0.4 < float(rate) < 0.6
    z = torch.randn(40, 3)
    log_px = model.decoder.log_prob(tokens, z)
    assert torch.allclose(model.decoder.log_prob(tokens, z, tokens), log_px)
    assert not torch.allclose(model.decoder.log_prob(tokens, z, dropped), log_px)


def test_a_few_training_steps_reduce_the_loss_on_the_hmm_corpus(tmp_path):
    sentences = _HMM().sample(200, seed=5)
    path = tmp_path / "corpus.txt"
    path.write_text("".join(" ".join(s) + "\n" for s in sentences))
    dm = TextDataModule(str(path), max_length=12, batch_size=32, val_fraction=0.0)
    model = _model(dm.vocab_size, "brenier", optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))
    dm.setup()
    tokens = dm.tensors("train")[0]

    def loss():
        torch.manual_seed(0)
        with torch.no_grad():
            out = model.decoder.log_prob(tokens, model.encode(tokens).sample((20,)))
            return float(-out.mean() + model.prior.kl(model.encode(tokens)).sum(1).mean())

    before = loss()
    trainer = L.Trainer(max_steps=25, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False,
                        limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(model, dm)
    assert loss() < before - 3.0
    # The checkpoint carries the vocabulary and rebuilds the same model.
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    assert Vocabulary.from_checkpoint(tmp_path / "model.ckpt") == dm.vocab
    loaded = TextVAE.load_from_checkpoint(tmp_path / "model.ckpt")
    z = torch.randn(len(tokens), 3)
    assert torch.equal(loaded.decoder.log_prob(tokens, z), model.decoder.log_prob(tokens, z))


def _train(model, tokens, steps, lr=1e-2, batch=32):
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        index = torch.randint(0, len(tokens), (batch,), generator=generator)
        out = model(tokens[index])
        loss = -out["log_px"].mean() + out["kl"].sum(1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _perplexity(model, tokens, k=20):
    torch.manual_seed(0)
    return math.exp(float(model.iw_nll(tokens, k, 10).sum()) / int((tokens != PAD).sum()))


def test_a_model_that_learns_the_hmm_corpus_has_perplexity_well_below_the_vocabulary():
    hmm = _HMM()
    train, test = hmm.sample(2000, seed=1), hmm.sample(100, seed=2)
    vocab = Vocabulary.build(train)
    model = _model(len(vocab), "brenier", latent_dim=4, embedding_dim=16, hidden_dim=32,
                   brenier_hidden=[16])
    x_train, x_test = _tokens(train, vocab), _tokens(test, vocab)
    before = _perplexity(model, x_test)
    _train(model, x_train, 200)
    after = _perplexity(model, x_test)
    # |V| = 44 here; a unigram model scores about 33, the HMM itself about 10.
    assert before > len(vocab) * 0.8
    assert after < len(vocab) / 3


@pytest.mark.slow
@pytest.mark.parametrize("z_injection", INJECTIONS)
def test_trained_perplexity_approaches_the_true_hmm_perplexity(z_injection):
    hmm = _HMM()
    train, test = hmm.sample(4000, seed=1), hmm.sample(300, seed=2)
    vocab = Vocabulary.build(train)
    model = _model(len(vocab), z_injection, latent_dim=4, embedding_dim=32, hidden_dim=64,
                   brenier_hidden=[32])
    x_train, x_test = _tokens(train, vocab), _tokens(test, vocab)
    _train(model, x_train, 1500, lr=5e-3)
    true = math.exp(-sum(hmm.log_prob(s) for s in test) / int((x_test != PAD).sum()))
    ppl = _perplexity(model, x_test, k=100)
    assert true * 0.95 < ppl < true * 1.25


# --------------------------------------------------------------------- API and configuration
@pytest.mark.parametrize("z_injection", INJECTIONS)
def test_greedy_generation_matches_teacher_forced_argmax(z_injection):
    _, vocab = _corpus(4)
    model = _model(len(vocab), z_injection)
    z = torch.randn(6, 3)
    generated = model.decoder.generate(z, 12, greedy=True)
    logits = model.decoder(generated, z)
    for row, row_logits in zip(generated, logits, strict=True):
        n = int((row != PAD).sum())
        assert row[n - 1] == EOS and bool((row[n:] == PAD).all())
        # Every token is the argmax given the tokens before it (the forced final <eos> aside).
        m = n if n < 12 else 11
        assert torch.equal(row_logits[:m].argmax(-1) + 2, row[:m])
    assert model.sample(5).shape == (5, 12) and model.reconstruct(generated).shape == (6, 12)


def test_hparams_rebuild_an_identical_model():
    tokens, vocab = _corpus(4)
    model = _model(len(vocab), "brenier", L=1.5)
    rebuilt = TextVAE(**model.hparams)
    rebuilt.load_state_dict(model.state_dict())
    z = torch.randn(4, 3)
    assert torch.equal(model.decoder.log_prob(tokens, z), rebuilt.decoder.log_prob(tokens, z))
    assert rebuilt.hparams["prior"]["class_path"] == "ilvae.priors.StandardNormal"


@pytest.mark.parametrize("field,kw", [
    ("z_injection", {"z_injection": "concat"}),
    ("vocab_size", {"z_injection": "brenier", "vocab_size": 6}),
    ("vocab_size", {"vocab_size": 4}),
    ("word_dropout", {"word_dropout": 1.0}),
    ("beta", {"beta": -1.0}),
    ("data_shape", {"data_shape": (1,)}),
    ("num_iw_samples", {"num_iw_samples": -1}),
])
def test_bad_configuration_names_the_field(field, kw):
    args = {"data_shape": (12,), "vocab_size": 20} | kw
    with pytest.raises(ConfigurationError, match=field):
        TextVAE(**args)


def test_wrong_batches_are_rejected_with_the_expected_layout():
    _, vocab = _corpus(4)
    model = _model(len(vocab))
    with pytest.raises(ConfigurationError, match="int64 token rows"):
        model.training_step((torch.rand(4, 12), None), 0)


def _cli_links_vocab_size():
    from ilvae.cli import ILVAECLI

    return "vocab_size" in inspect.getsource(ILVAECLI.add_arguments_to_parser)


@pytest.mark.slow
@pytest.mark.skipif(not _cli_links_vocab_size(), reason="ilvae.cli does not link vocab_size")
@pytest.mark.parametrize("name", ["text_vae.yaml", "text_lidvae.yaml"])
def test_text_configs_fit_offline_and_save_the_vocabulary(tmp_path, name):
    from ilvae.cli import run

    config = REPO / "configs" / "text" / name
    cli = run(["fit", "--config", str(config), f"--trainer.default_root_dir={tmp_path}",
               f"--data.init_args.train_path={REPO / 'configs' / 'text' / 'sample_corpus.txt'}",
               "--trainer.max_epochs=1", "--trainer.enable_progress_bar=false"])
    log_dir = Path(cli.trainer.log_dir)
    assert Vocabulary.load(log_dir / "vocab.json") == cli.datamodule.vocab
    assert cli.model.vocab_size == cli.datamodule.vocab_size
    assert "val/ppl" in cli.trainer.callback_metrics


# ------------------------------------------------------------------- non-finite losses
class _FaultAt(L.Callback):
    """At training step ``step``: record the batch, the weights and the RNG state the step
    starts from, then break it (β = NaN, or NaN embedding weights); β is restored after it."""

    def __init__(self, step, fault):
        self.step, self.fault, self.seen, self.after = step, fault, None, {}
        self._beta = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step != self.step:
            return
        self.seen = {"tokens": batch[0].clone(), "batch_idx": batch_idx,
                     "rng": torch.get_rng_state(),
                     "params": {k: v.detach().clone() for k, v in pl_module.named_parameters()}}
        if self.fault == "beta":
            self._beta, pl_module.beta = pl_module.beta, math.nan
        else:
            with torch.no_grad():
                pl_module.encoder.embedding.weight.fill_(math.nan)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._beta is not None:
            pl_module.beta, self._beta = self._beta, None
        step = trainer.global_step  # the step just done is step − 1
        self.after[step - 1] = {k: v.detach().clone() for k, v in pl_module.named_parameters()}


def _adam_steps(trainer):
    state = trainer.optimizers[0].state if trainer.optimizers else {}
    return [float(s["step"]) for s in state.values()]


def _guarded_fit(tmp_path, fault, callbacks=()):
    sentences = _HMM().sample(40, seed=6)
    path = tmp_path / "corpus.txt"
    path.write_text("".join(" ".join(s) + "\n" for s in sentences))
    dm = TextDataModule(str(path), max_length=12, batch_size=8, val_fraction=0.0)
    model = _model(dm.vocab_size, "brenier", beta=0.5)
    injected = _FaultAt(2, fault)
    trainer = L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, default_root_dir=tmp_path,
                        callbacks=[*callbacks, injected])
    return model, dm, trainer, injected


def test_nan_loss_stops_before_the_update_and_reports_the_steps_terms(tmp_path):
    """No callback: TextVAE's default loss guard stops at the step whose loss is NaN, before its
    backward pass, and reports its terms; the finite ones equal an independent computation."""
    model, dm, trainer, injected = _guarded_fit(tmp_path, "beta")
    with pytest.raises(NonFiniteLossError, match=r"at step 2 \(epoch 0, batch 2\)") as info:
        trainer.fit(model, dm)
    report = info.value.report
    assert report["step"] == 2 and report["batch_idx"] == injected.seen["batch_idx"] == 2
    terms = report["terms"]
    assert math.isnan(terms["train/loss"]) and math.isnan(terms["train/beta"])
    # The weights in memory are those the bad step started from: nothing was applied.
    for name, before in injected.seen["params"].items():
        assert torch.equal(dict(model.named_parameters())[name], before), name
    # KL in closed form, recon by the per-token loop, on the same z.
    tokens = injected.seen["tokens"]
    torch.set_rng_state(injected.seen["rng"])
    with torch.no_grad():
        posterior = model.encode(tokens)
        z = posterior.rsample()
        loc, scale = posterior.loc, posterior.scale
        kl = 0.5 * (loc**2 + scale**2 - torch.log(scale**2) - 1).sum(1).mean()
        recon = -torch.stack([_reference_log_px(model, row, zi)
                              for row, zi in zip(tokens, z, strict=True)]).mean()
    assert terms["train/kl"] == pytest.approx(float(kl), rel=1e-5)
    assert terms["train/recon"] == pytest.approx(float(recon), rel=1e-5)
    assert terms["train/elbo"] == pytest.approx(-float(recon + kl), rel=1e-5)


def test_nan_weights_stop_on_the_encoders_rejected_parameters(tmp_path):
    model, dm, trainer, _ = _guarded_fit(tmp_path, "weights")
    with pytest.raises(NonFiniteLossError, match="at step 2 .*non-finite distribution "
                                                 r"parameter \(loc"):
        trainer.fit(model, dm)


def test_skip_leaves_weights_and_adam_untouched_and_counts_the_batch(tmp_path):
    from ilvae.callbacks.fault_tolerance import NonFiniteLossGuard

    guard = NonFiniteLossGuard(action="skip")
    model, dm, trainer, injected = _guarded_fit(tmp_path, "beta", [guard])
    trainer.fit(model, dm)
    assert trainer.global_step == 10
    assert [s["step"] for s in model.loss_guard.skipped] == [2]
    assert math.isnan(model.loss_guard.skipped[0]["terms"]["train/loss"])
    for name, before in injected.seen["params"].items():
        assert torch.equal(injected.after[2][name], before), name
    # Adam's per-parameter step count is one less than the optimiser steps: the skipped batch
    # left the count (and the moments) alone.
    assert set(_adam_steps(trainer)) == {trainer.global_step - 1.0}
    # Step 3 (finite) changes the weights: the equality above can fail.
    assert any(not torch.equal(injected.after[3][k], v) for k, v in injected.after[2].items())
    metrics = trainer.callback_metrics
    assert float(metrics["train/skipped_batches"]) == 1.0
    assert all(math.isfinite(float(v)) for v in metrics.values())  # no NaN in epoch means
    # Without a logger, the report and the vocabulary go to default_root_dir, not the cwd.
    report = json.loads((tmp_path / "nonfinite_loss.json").read_text())
    assert report["action"] == "skip" and [s["step"] for s in report["skipped"]] == [2]
    assert Vocabulary.load(tmp_path / "vocab.json") == dm.vocab


class _Payload:
    """Unpickling this runs ``open(marker, "w")``: a stand-in for arbitrary code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_load_from_checkpoint_is_weights_only_by_default(tmp_path):
    tokens, vocab = _corpus(4)
    model = _model(len(vocab), "brenier")
    checkpoint = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                  "pytorch-lightning_version": L.__version__}
    torch.save(checkpoint, tmp_path / "good.ckpt")
    loaded = TextVAE.load_from_checkpoint(tmp_path / "good.ckpt")
    z = torch.randn(4, 3)
    assert torch.equal(loaded.decoder.log_prob(tokens, z), model.decoder.log_prob(tokens, z))
    marker = tmp_path / "payload-ran"
    torch.save({**checkpoint, "extra": _Payload(marker)}, tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointError, match="refused"):
        TextVAE.load_from_checkpoint(tmp_path / "bad.ckpt")
    assert not marker.exists()
    torch.load(tmp_path / "bad.ckpt", weights_only=False)  # control: unpickling runs it
    assert marker.exists()


def test_check_data_rejects_tokens_beyond_the_vocabulary_naming_vocab_size(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("".join(" ".join(s) + "\n" for s in _HMM().sample(20, seed=7)))
    dm = TextDataModule(str(path), max_length=12, val_fraction=0.0)
    top = int(dm.tensors("fit")[0].max())
    _model(top + 1).check_data(dm)  # every id fits
    with pytest.raises(ConfigurationError, match=f"token id {top} but vocab_size={top}"):
        _model(top).check_data(dm)
