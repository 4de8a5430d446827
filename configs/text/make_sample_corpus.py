"""Write the small synthetic corpus the text configs train on (``sample_corpus.txt``).

Sentences come from a random hidden Markov model whose hidden state is a pair (topic, state):
the topic is drawn once per sentence and never changes, the state moves along a sparse random
transition matrix shared by the topics, and each (topic, state) emits words from its own sparse
random distribution over a made-up vocabulary. Every state can also end the sentence. The topic
is a sentence-level cause that a language model alone can only infer from the words so far,
which is what gives a text VAE's latent code something to carry.

    python configs/text/make_sample_corpus.py       # writes configs/text/sample_corpus.txt
    python configs/text/make_sample_corpus.py --sentences 2000 --seed 1 --out corpus.txt
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

_SYLLABLES = ("ba", "ko", "ri", "tu", "me", "sa", "lo", "ni", "de", "fu", "ga", "pi")


def make_words(n: int, rng: np.random.Generator) -> list[str]:
    """n distinct made-up words of two or three syllables."""
    words: list[str] = []
    while len(words) < n:
        word = "".join(rng.choice(_SYLLABLES, size=int(rng.integers(2, 4))))
        if word not in words:
            words.append(word)
    return words


def sample_corpus(num_sentences: int = 400, num_topics: int = 3, num_states: int = 5,
                  vocab_size: int = 40, stop: float = 0.15, max_words: int = 14,
                  seed: int = 0) -> list[str]:
    """Sentences (words joined by spaces) of the random topic HMM described above.

    ``stop`` is the probability of ending the sentence after each word (once at least two
    words are out); sentences are cut at ``max_words``.
    """
    rng = np.random.default_rng(seed)
    words = make_words(vocab_size, rng)
    start = rng.dirichlet(np.full(num_states, 1.0))
    transition = rng.dirichlet(np.full(num_states, 0.3), size=num_states)
    emission = rng.dirichlet(np.full(vocab_size, 0.05), size=(num_topics, num_states))
    sentences = []
    for _ in range(num_sentences):
        topic = rng.integers(num_topics)
        state = rng.choice(num_states, p=start)
        sentence = []
        while len(sentence) < max_words:
            sentence.append(words[rng.choice(vocab_size, p=emission[topic, state])])
            if len(sentence) >= 2 and rng.random() < stop:
                break
            state = rng.choice(num_states, p=transition[state])
        sentences.append(" ".join(sentence))
    return sentences


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).with_name("sample_corpus.txt")))
    parser.add_argument("--sentences", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    lines = sample_corpus(args.sentences, seed=args.seed)
    Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {len(lines)} sentences to {args.out}")


if __name__ == "__main__":
    main()
