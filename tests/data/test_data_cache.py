"""The workspace's data cache: an entry is made once per key, read back after, made again when damaged or when
anything in its key changes; LMLAB_DATA_CACHE=0 turns it off. Trials sharing data settings share the BPE."""

import yaml
from helpers.recipes import tiny_lm

from lmlab.data.cache import cached


def test_made_once_then_read_back(tmp_path, monkeypatch):
    calls = []

    def make():
        calls.append(1)
        return {"ids": [1, 2, 3]}

    assert cached(tmp_path, "kind", {"split": "a"}, make) == {"ids": [1, 2, 3]}
    assert cached(tmp_path, "kind", {"split": "a"}, make) == {"ids": [1, 2, 3]}
    assert len(calls) == 1
    cached(tmp_path, "kind", {"split": "b"}, make)  # another split fingerprint: another entry
    assert len(calls) == 2
    # damaged entries (a full disk, an older format): made again, not an error
    for f in (tmp_path / "cache" / "data" / "kind").glob("*.pkl"):
        f.write_bytes(b"not a pickle")
    assert cached(tmp_path, "kind", {"split": "a"}, make) == {"ids": [1, 2, 3]} and len(calls) == 3
    monkeypatch.setenv("LMLAB_DATA_CACHE", "0")
    cached(tmp_path, "kind", {"split": "a"}, make)
    assert len(calls) == 4


def test_runs_with_the_same_data_share_the_trained_bpe(workspace):
    from lmlab.data.pipeline import split_data
    from lmlab.data.tokenizer import tokenizer_hash
    from lmlab.recipe.loading import load_recipe

    path = workspace / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_lm()))
    first = split_data(load_recipe(path))
    again = split_data(load_recipe(path, ["train.lr=1e-3"]))  # a trial's override: same data, same tokenizer
    assert tokenizer_hash(first.tokenizer) == tokenizer_hash(again.tokenizer)
    assert len(list((workspace / "lmlab-runs" / "cache" / "data" / "bpe").glob("*.pkl"))) == 1
    split_data(load_recipe(path, ["tokenizer.vocab_size=300"]))  # another vocabulary: trained again
    assert len(list((workspace / "lmlab-runs" / "cache" / "data" / "bpe").glob("*.pkl"))) == 2
