"""A synthetic language with learnable structure, and a MindFormers data loader over it.

The language (``SyntheticLanguage``) is a seeded Markov chain over the ids ``[first_id, vocab_size)``:
every word has one *successor* (a random permutation that forms a single cycle through all the
words); each next word is the successor of the current one, except that with probability ``noise``
it is a uniformly random word (a "jump"). A sample is ``BOS w_1 w_2 ...``. A model that learned
the language continues any prompt along the cycle, so the expected greedy continuation of a prompt
is known exactly (``continuation``). Ids 0 and 1 are BOS and EOS (as in DeepSeek-V3), id 2 is
``<unk>``. Everything is a pure function of (vocab_size, seed, noise, sample index): the same on
every run and every rank.

Words are pronounceable strings ("ba", "ke", ...). ``write_tokenizer`` writes a word-level
``tokenizer.json`` (+ ``tokenizer_config.json``) that ``DeepseekV3Tokenizer`` loads, so text goes
through stock ``pipeline("text_generation")``, ``Trainer.predict`` and ``run_mindformer.py``.

YAML (stock ``CausalLanguageModelDataset`` builds the loader with ``build_dataset_loader``)::

    train_dataset: &train_dataset
      data_loader:
        type: SyntheticLanguageDataLoader
        auto_register: deepseek3.SyntheticLanguageDataLoader
        vocab_size: 128        # = model_config.vocab_size
        seq_length: 64         # = model_config.seq_length; samples hold seq_length + 1 ids
        num_samples: 512       # samples per epoch
        seed: 0                # the language (successor table)
        data_seed: 1           # the samples drawn from it
        noise: 0.1             # probability of a random jump
        shuffle: False
      input_columns: ['input_ids']
    train_dataset_task:
      type: CausalLanguageModelDataset
      dataset_config: *train_dataset

Command line::

    python -m mindformers_dsv3.data --write-tokenizer DIR [--vocab-size 128]
    python -m mindformers_dsv3.data --sample 3 [--seed 0]
"""
import argparse
import json
import os

import numpy as np
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

__all__ = ["SyntheticLanguage", "SyntheticLanguageDataLoader", "BOS_ID", "EOS_ID", "UNK_ID"]

BOS_ID, EOS_ID, UNK_ID = 0, 1, 2
BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
UNK_TOKEN = "<unk>"
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


def _words(count):
    """`count` distinct pronounceable words: ba be ... zu, then bab bad ... (deterministic)."""
    syllables = [c + v for c in _CONSONANTS for v in _VOWELS]
    words = list(syllables)
    for s in syllables:
        if len(words) >= count:
            break
        words.extend(s + c for c in _CONSONANTS)
    if len(words) < count:
        words.extend(a + b for a in syllables for b in syllables)
    return words[:count]


class SyntheticLanguage:
    """A seeded Markov language: each word is followed by its successor, or a random word w.p. `noise`.

    Args:
        vocab_size (int): ids in the vocabulary (the model's ``vocab_size``); words are
            ``[first_id, vocab_size)``, at least 2 of them.
        seed (int): seed of the successor table (the language itself).
        noise (float): probability, in [0, 1), that a next word is a uniformly random word.
        data_seed (int): seed of the samples (which start word, where the jumps fall).
    """

    first_id = UNK_ID + 1

    def __init__(self, vocab_size=128, seed=0, noise=0.1, data_seed=1):
        if not isinstance(vocab_size, int) or vocab_size < self.first_id + 2:
            raise ValueError(f"vocab_size={vocab_size!r} must be an int >= {self.first_id + 2}")
        if not 0 <= float(noise) < 1:
            raise ValueError(f"noise={noise!r} must be in [0, 1)")
        self.vocab_size, self.seed, self.noise, self.data_seed = vocab_size, int(seed), float(noise), int(data_seed)
        self.word_ids = np.arange(self.first_id, vocab_size, dtype=np.int64)
        cycle = np.random.default_rng(self.seed).permutation(self.word_ids)
        self.successor = np.full(vocab_size, -1, dtype=np.int64)
        self.successor[cycle] = np.roll(cycle, -1)
        self.words = _words(len(self.word_ids))

    # ------------------------------------------------------------------ samples
    def sample(self, index, length):
        """Sample `index` (deterministic): BOS followed by length - 1 words, int32 of shape (length,)."""
        rng = np.random.default_rng([self.data_seed, int(index)])
        out = np.empty(length, dtype=np.int32)
        out[0] = BOS_ID
        word = int(rng.choice(self.word_ids))
        jumps = rng.random(length) < self.noise
        random_words = rng.choice(self.word_ids, size=length)
        for i in range(1, length):
            out[i] = word
            word = int(random_words[i]) if jumps[i] else int(self.successor[word])
        return out

    def continuation(self, prompt_ids, length):
        """The most likely next `length` ids after `prompt_ids` (the successors of its last word)."""
        word = int(prompt_ids[-1])
        if not self.first_id <= word < self.vocab_size:
            raise ValueError(f"the prompt must end with a word id in [{self.first_id}, {self.vocab_size}), got {word}")
        out = []
        for _ in range(length):
            word = int(self.successor[word])
            out.append(word)
        return out

    def prompt(self, index, length):
        """A prompt of `length` words (no BOS) that follows the cycle, from a seeded start."""
        start = int(np.random.default_rng([self.data_seed, 10**6 + int(index)]).choice(self.word_ids))
        return [start] + self.continuation([start], length - 1)

    def bigram_entropy(self):
        """Entropy (nats) of the next word given the current one: the loss floor of a perfect model."""
        n = len(self.word_ids)
        p_succ = 1 - self.noise + self.noise / n
        p_other = self.noise / n
        return float(-(p_succ * np.log(p_succ) + (n - 1) * p_other * np.log(p_other))) if p_other else 0.0

    # ------------------------------------------------------------------ text
    def decode(self, ids):
        """Words of the word ids (BOS/EOS dropped), joined by spaces."""
        return " ".join(self.words[int(i) - self.first_id] for i in ids if int(i) >= self.first_id)

    def encode(self, text):
        index = {w: i + self.first_id for i, w in enumerate(self.words)}
        try:
            return [index[w] for w in text.split()]
        except KeyError as e:
            raise ValueError(f"{e.args[0]!r} is not a word of the synthetic language") from None

    def tokenizer_json(self):
        """A word-level `tokenizers` tokenizer.json (as a dict) for this vocabulary."""
        vocab = {BOS_TOKEN: BOS_ID, EOS_TOKEN: EOS_ID, UNK_TOKEN: UNK_ID}
        vocab.update({w: i + self.first_id for i, w in enumerate(self.words)})
        special = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                    "normalized": False, "special": True}
                   for i, t in ((BOS_ID, BOS_TOKEN), (EOS_ID, EOS_TOKEN), (UNK_ID, UNK_TOKEN))]
        return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": special,
                "normalizer": None, "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": None,
                "decoder": None, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": UNK_TOKEN}}

    def write_tokenizer(self, folder):
        """Write tokenizer.json and tokenizer_config.json into `folder`; returns the tokenizer.json path."""
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, "tokenizer.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.tokenizer_json(), f, ensure_ascii=False, indent=1)
            f.write("\n")
        config = {"tokenizer_class": "DeepseekV3Tokenizer", "bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN,
                  "pad_token": EOS_TOKEN, "add_bos_token": True, "add_eos_token": False,
                  "model_max_length": 4096, "clean_up_tokenization_spaces": False}
        with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, ensure_ascii=False, indent=1)
            f.write("\n")
        return path


class _Source:
    """Random-access source for GeneratorDataset: sample i -> the requested columns."""

    def __init__(self, language, seq_length, num_samples, columns):
        self.language, self.seq_length, self.num_samples, self.columns = language, seq_length, num_samples, columns

    def __len__(self):
        return self.num_samples

    def __getitem__(self, index):
        tokens = self.language.sample(index, self.seq_length + 1)
        if self.columns == ["input_ids"]:
            return (tokens,)
        return tokens[:-1], tokens[1:]


_COLUMN_CHOICES = (["input_ids"], ["input_ids", "labels"])


@MindFormerRegister.register(MindFormerModuleType.DATASET_LOADER)
class SyntheticLanguageDataLoader:
    """MindFormers data loader (``train_dataset.data_loader.type``) over ``SyntheticLanguage``.

    Returns a ``mindspore.dataset.GeneratorDataset``. With ``input_columns: ['input_ids']`` each
    sample holds ``seq_length + 1`` ids (the model shifts them); with ``['input_ids', 'labels']``
    both hold ``seq_length`` ids, labels shifted by one. Sharded over data-parallel ranks by the
    stock dataset (``num_shards`` / ``shard_id``): rank r of n reads samples r, r + n, ...

    Args:
        vocab_size (int): the model's vocab_size.
        seq_length (int): the model's seq_length.
        num_samples (int): samples per epoch (``run_mindformer.py --num_samples`` sets it).
        seed, noise, data_seed: see ``SyntheticLanguage``.
        shuffle (bool): shuffle sample order (seeded by MindSpore's dataset seed).
        column_names, num_shards, shard_id, num_parallel_workers, python_multiprocessing,
            dataset_dir: passed by the stock dataset; ``dataset_dir`` must be unset (the corpus is
            generated, not read).
    """

    def __new__(cls, vocab_size=None, seq_length=None, num_samples=512, seed=0, noise=0.1, data_seed=1,
                shuffle=False, column_names=None, num_shards=None, shard_id=None, num_parallel_workers=1,
                python_multiprocessing=False, dataset_dir=None, **kwargs):
        from mindspore.dataset import GeneratorDataset

        if kwargs:
            raise TypeError(f"train_dataset.data_loader: unknown key(s) {sorted(kwargs)} for "
                            f"SyntheticLanguageDataLoader")
        for key, value in (("vocab_size", vocab_size), ("seq_length", seq_length), ("num_samples", num_samples)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"train_dataset.data_loader.{key}={value!r} must be a positive int")
        if dataset_dir:
            raise ValueError(f"train_dataset.data_loader.dataset_dir={dataset_dir!r}: "
                             "SyntheticLanguageDataLoader generates its corpus; leave dataset_dir unset")
        columns = list(column_names) if column_names else ["input_ids"]
        if columns not in _COLUMN_CHOICES:
            raise ValueError(f"train_dataset.input_columns={columns}: SyntheticLanguageDataLoader gives "
                             f"{' or '.join(map(str, _COLUMN_CHOICES))}")
        language = SyntheticLanguage(vocab_size, seed=seed, noise=noise, data_seed=data_seed)
        return GeneratorDataset(_Source(language, seq_length, num_samples, columns), column_names=columns,
                                shuffle=bool(shuffle), num_shards=num_shards, shard_id=shard_id,
                                num_parallel_workers=max(int(num_parallel_workers or 1), 1),
                                python_multiprocessing=bool(python_multiprocessing))


def _main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m mindformers_dsv3.data", description=__doc__.split("\n")[0])
    parser.add_argument("--vocab-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument("--write-tokenizer", metavar="DIR", help="write tokenizer.json + tokenizer_config.json")
    parser.add_argument("--sample", type=int, metavar="N", help="print N samples as words")
    parser.add_argument("--length", type=int, default=16)
    args = parser.parse_args(argv)
    language = SyntheticLanguage(args.vocab_size, seed=args.seed, noise=args.noise)
    if args.write_tokenizer:
        print(language.write_tokenizer(args.write_tokenizer))
    for i in range(args.sample or 0):
        print(language.decode(language.sample(i, args.length)))


if __name__ == "__main__":
    _main()
