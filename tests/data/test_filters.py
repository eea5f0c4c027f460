"""Audited filters: exact drops on crafted examples, the probabilistic curve, the report, the cache."""

from __future__ import annotations

import json
import random
import sys
import textwrap

import pytest

from lmlab.data.filters import (
    FilterReport,
    apply_filters,
    example_uniform,
    fingerprint,
    select_texts,
    unbalanced_marks,
)
from lmlab.errors import LmlabError
from lmlab.recipe.filters import MedianLengthDropFilter, parse_filters


def outputs(*texts: str) -> list[dict]:
    return [{"output": t} for t in texts]


def chat(*turns: str, user: str = "hi there") -> dict:
    """A conversation: one user turn before each assistant turn."""
    messages = [{"role": "system", "content": "You are terse."}]
    for t in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": t}]
    return {"messages": messages}


def kept_outputs(records: list[dict]) -> list[str]:
    return [r["output"] for r in records]


def words(n: int, tag: str = "w") -> str:
    return " ".join(f"{tag}{i}" for i in range(n))


# ------------------------------------------------------------------------------------- field paths
def test_select_texts_reads_plain_nested_and_chat_fields():
    record = {"output": "a b", "tags": ["x", "y"], "meta": {"title": "T"}, "none": None, **chat("one", "two")}
    assert select_texts(record, "output") == ["a b"]
    assert select_texts(record, "tags") == ["x", "y"]
    assert select_texts(record, "meta.title") == ["T"]
    assert select_texts(record, "none") == []
    assert select_texts(record, "messages.assistant") == ["one", "two"]
    assert select_texts(record, "messages.user") == ["hi there", "hi there"]
    assert select_texts(record, "messages") == ["You are terse.", "hi there", "one", "hi there", "two"]
    assert select_texts(record, "missing") is None
    assert select_texts({"messages": []}, "messages.assistant") == []


def test_missing_field_and_unknown_role_are_errors_naming_the_filter():
    with pytest.raises(LmlabError, match=r"^data.filters\[1\].field: 'outptu' not found in example 0 "
                                         r"\(its keys: output\); fix the field path$"):
        apply_filters(outputs("a"), [{"kind": "regex", "field": "output", "pattern": "z", "action": "drop"},
                                     {"kind": "word_count", "field": "outptu", "min": 1}], seed=0)
    with pytest.raises(LmlabError, match=r"^data.filters\[0\].field: no message has role 'assistent' "
                                         r"\(roles seen: assistant, system, user\); fix the role$"):
        apply_filters([chat("a")], [{"kind": "word_count", "field": "messages.assistent", "min": 1}], seed=0)


# -------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("spec, message", [
    ({"kind": "word_count", "field": "output"}, "data.filters[0].min: set `min`, `max` or both"),
    ({"kind": "word_count", "field": "output", "min": 5, "max": 2},
     "data.filters[0].min: 5 is larger than max (2); swap or fix them"),
    ({"kind": "median_length_drop", "lo": 10, "hi": 10},
     "data.filters[0].hi: must be > lo (10), got 10; raise hi or lower lo"),
    ({"kind": "median_length_drop", "lo": 1, "hi": 5, "sed": 3},
     "data.filters[0].sed: unknown key for median_length_drop; known keys: name, kind, field, lo, hi, seed"),
    ({"kind": "regex", "field": "output", "pattern": "a"}, "data.filters[0].action: required; add it"),
    ({"kind": "regex", "field": "output", "pattern": "(a", "action": "keep"},
     "data.filters[0].pattern: not a valid regular expression (missing ), unterminated subpattern at "
     "position 0); check brackets and escapes"),
    ({"kind": "predicate", "path": "mymodule.keep"},
     "data.filters[0].path: must look like 'package.module:function', got 'mymodule.keep'"),
    ({"kind": "balanced_markup", "field": "output", "marks": ["_"]},
     "data.filters[0].marks.0: input should be '*', '\"' or '```'"),
])
def test_invalid_specs_name_the_field_and_the_fix(spec, message):
    with pytest.raises(LmlabError) as e:
        parse_filters([spec])
    assert str(e.value) == message


def test_unknown_kind_lists_the_kinds():
    with pytest.raises(LmlabError, match="expected tags: 'word_count', 'token_count', 'median_length_drop', "
                                         "'balanced_markup', 'regex', 'dedupe_exact', 'dedupe_near', 'predicate'"):
        parse_filters([{"kind": "lenght"}])


# ---------------------------------------------------------------------------------- length bounds
def test_word_count_min_and_max_drop_exactly_the_out_of_bounds_examples():
    records = outputs("one", "one two", "one two three", "one two three four", "  one\ttwo\nthree  ")
    kept, report = apply_filters(records, [{"kind": "word_count", "field": "output", "min": 2, "max": 3}], seed=0)
    assert kept_outputs(kept) == ["one two", "one two three", "  one\ttwo\nthree  "]
    step = report.steps[0]
    assert (step.input, step.kept, step.dropped) == (5, 3, 2)
    assert step.reasons == {"has fewer than 2 words": 1, "has more than 3 words": 1}
    assert [(s.index, s.detail, s.text) for s in step.samples] == [
        (0, "1 words", "one"), (3, "4 words", "one two three four")]


def test_word_count_per_text_checks_every_assistant_turn_while_per_example_sums_them():
    records = [chat("a b c", "d"), chat("a b", "c d"), chat("a b c d e f g")]
    per_text = [{"kind": "word_count", "field": "messages.assistant", "min": 2, "per": "text"}]
    per_example = [{"kind": "word_count", "field": "messages.assistant", "min": 4}]
    kept, report = apply_filters(records, per_text, seed=0)
    assert kept == [records[1], records[2]]
    assert report.steps[0].reasons == {"a text has fewer than 2 words": 1}
    kept, _ = apply_filters(records, per_example, seed=0)
    assert kept == [records[0], records[1], records[2]]  # 4, 4 and 7 words in all


def test_token_count_uses_the_given_tokenizer_and_says_when_there_is_none():
    def byte_tokenizer(text: str) -> list[int]:
        return list(text.encode())

    records = outputs("ab", "abcd", "é")  # 2, 4 and 2 bytes
    spec = [{"kind": "token_count", "field": "output", "max": 3}]
    kept, report = apply_filters(records, spec, seed=0, tokenizer=byte_tokenizer)
    assert kept_outputs(kept) == ["ab", "é"]
    assert report.steps[0].reasons == {"has more than 3 tokens": 1}
    with pytest.raises(LmlabError) as e:
        apply_filters(records, spec, seed=0)
    assert str(e.value) == ("data.filters[0]: token_count needs a tokenizer and none is available here; "
                            "pass tokenizer= (text -> ids) or use kind: word_count")
    with pytest.raises(LmlabError) as e:  # what calling a Hugging Face tokenizer returns
        apply_filters(records, spec, seed=0, tokenizer=lambda text: {"input_ids": [1, 2], "attention_mask": [1, 1]})
    assert str(e.value) == ("tokenizer: must turn text into a list of token ids, got dict; "
                            "pass e.g. lambda text: tok.encode(text, add_special_tokens=False)")


# ------------------------------------------------------------------------------ median length drop
def test_drop_probability_is_one_at_lo_falling_linearly_to_zero_at_hi():
    spec = MedianLengthDropFilter(lo=5, hi=25)
    assert [spec.drop_probability(w) for w in (0, 5, 10, 15, 20, 25, 40)] == [1.0, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_median_drop_is_certain_outside_lo_hi_for_every_seed(seed):
    # medians of the assistant turns: 2, 5 (= lo), 25 (= hi), 40; user turns (50 words) are not counted
    records = [chat(words(2), words(1), words(90), user=words(50)),
               chat(words(5), words(5), words(1)),
               chat(words(25), words(30), words(1)),
               chat(words(40))]
    spec = [{"kind": "median_length_drop", "field": "messages.assistant", "lo": 5, "hi": 25, "seed": seed}]
    kept, report = apply_filters(records, spec, seed=99)
    assert kept == records[2:]
    assert report.steps[0].reasons == {"median <= 5 words": 2}
    assert [s.detail for s in report.steps[0].samples] == ["median 2 words, p_drop 1.00", "median 5 words, p_drop 1.00"]


def test_median_of_an_even_number_of_turns_is_the_mean_of_the_middle_two():
    # medians 4.5 (drop: p = 1 at <= lo 5) and 25.5 (keep); an example without assistant turns has median 0
    records = [chat(words(4), words(5)), chat(words(25), words(26)), {"messages": [{"role": "user", "content": "x"}]}]
    spec = [{"kind": "median_length_drop", "lo": 5, "hi": 25}]
    kept, report = apply_filters(records, spec, seed=0)
    assert kept == [records[1]]
    assert [s.detail for s in report.steps[0].samples] == ["median 4.5 words, p_drop 1.00", "median 0 words, p_drop 1.00"]


def synthetic_chats(lengths: list[int]) -> list[dict]:
    """One chat per length, median assistant length = that length, every chat's content unique."""
    return [chat(f"t{i}", words(length, tag=f"e{i}-"), words(100)) for i, length in enumerate(lengths)]


@pytest.mark.parametrize("seed", [1337, 7])
def test_median_drop_rate_matches_the_curve_within_3_points_on_10k_examples(seed):
    lo, hi = 4, 24
    buckets = [2, 9, 14, 19, 30]  # p_drop 1, .75, .5, .25, 0; 2,000 examples each: a binomial sd of <= 1.1 points
    lengths = [buckets[i % len(buckets)] for i in range(10_000)]
    spec = MedianLengthDropFilter(lo=lo, hi=hi, seed=seed)
    kept, report = apply_filters(synthetic_chats(lengths), [spec], seed=0)
    kept_ids = {r["messages"][2]["content"] for r in kept}
    for length in buckets:
        ids = [f"t{i}" for i, n in enumerate(lengths) if n == length]
        rate = sum(i not in kept_ids for i in ids) / len(ids)
        assert abs(rate - spec.drop_probability(length)) <= 0.03, (length, rate)
    expected = sum(spec.drop_probability(n) for n in lengths)
    assert abs(report.steps[0].dropped - expected) / len(lengths) <= 0.01


def test_median_drop_fate_depends_only_on_seed_and_content_not_on_order_or_neighbours():
    lengths = [10, 12, 14, 16, 18] * 40  # all in the sampled band of lo=8, hi=20
    records = synthetic_chats(lengths)
    spec = [{"kind": "median_length_drop", "lo": 8, "hi": 20}]
    kept_a, _ = apply_filters(records, spec, seed=5)
    kept_b, _ = apply_filters(records, spec, seed=5)
    assert kept_a == kept_b
    kept_other_seed, _ = apply_filters(records, spec, seed=6)
    assert kept_other_seed != kept_a
    shuffled = records[:]
    random.Random(0).shuffle(shuffled)
    kept_shuffled, _ = apply_filters(shuffled, spec, seed=5)
    key = json.dumps
    assert sorted(map(key, kept_shuffled)) == sorted(map(key, kept_a))
    more = records[:100] + [chat("new", words(13, "n"))] + records[100:]
    kept_more, _ = apply_filters(more, spec, seed=5)
    assert [r for r in kept_more if r["messages"][2]["content"] != "new"] == kept_a


def test_example_uniform_is_a_pure_function_of_seed_and_content():
    assert example_uniform(3, "abc") == example_uniform(3, "abc")
    assert example_uniform(3, "abc") != example_uniform(4, "abc")
    assert 0 <= example_uniform(0, "x") < 1


# --------------------------------------------------------------------------------- balanced markup
def test_unbalanced_marks_counts_stars_and_quotes_outside_code_fences():
    assert unbalanced_marks("*waves* hi", ["*", '"', "```"]) == {}
    assert unbalanced_marks("*waves hi", ["*", '"', "```"]) == {"*": 1}
    assert unbalanced_marks('**bold** and "quoted"', ["*", '"', "```"]) == {}
    assert unbalanced_marks("```py\nx = a * b\n```", ["*", '"', "```"]) == {}
    assert unbalanced_marks('```py\nprint("x)\n', ["*", '"', "```"]) == {'"': 1, "```": 1}
    assert unbalanced_marks('He said "go *now', ['"']) == {'"': 1}


def test_balanced_markup_drops_exactly_the_malformed_examples():
    records = outputs(
        "*smiles* Hello!",               # keep
        "*smiles Hello!",                # drop: *
        'She said "hi" and left',        # keep
        'She said "hi and left',         # drop: "
        "```\nx = a * b\n```",           # keep: the star is code
        "```python\nprint(1)",           # drop: ```
        '*waves "hi',                    # drop: * (first failing mark), also "
    )
    kept, report = apply_filters(records, [{"kind": "balanced_markup", "field": "output"}], seed=0)
    assert kept_outputs(kept) == ["*smiles* Hello!", 'She said "hi" and left', "```\nx = a * b\n```"]
    assert report.steps[0].reasons == {"unbalanced *": 2, 'unbalanced "': 1, "unbalanced ```": 1}
    assert [(s.index, s.detail) for s in report.steps[0].samples] == [(1, "1 x *"), (3, '1 x "'), (5, "1 x ```")]


def test_balanced_markup_checks_each_turn_and_only_the_chosen_marks():
    # two turns with one '*' each: even in total, but each turn is broken
    records = [chat("*waves", "hello*"), chat("*waves*", 'he said "hi')]
    kept, _ = apply_filters(records, [{"kind": "balanced_markup", "field": "messages.assistant"}], seed=0)
    assert kept == []
    kept, _ = apply_filters(records, [{"kind": "balanced_markup", "field": "messages.assistant", "marks": ["*"]}], seed=0)
    assert kept == [records[1]]


# ------------------------------------------------------------------------------------------- regex
def test_regex_keep_and_drop():
    records = outputs("As an AI language model, I cannot", "Sure! Here it is.", "as an ai, no")
    drop = [{"kind": "regex", "field": "output", "pattern": "(?i)as an ai", "action": "drop"}]
    kept, report = apply_filters(records, drop, seed=0)
    assert kept_outputs(kept) == ["Sure! Here it is."]
    assert report.steps[0].reasons == {"matches /(?i)as an ai/": 2}
    keep = [{"kind": "regex", "field": "output", "pattern": "^Sure", "action": "keep"}]
    kept, report = apply_filters(records, keep, seed=0)
    assert kept_outputs(kept) == ["Sure! Here it is."]
    assert report.steps[0].reasons == {"does not match /^Sure/": 2}


# ------------------------------------------------------------------------------------------ dedupe
def test_exact_dedupe_keeps_the_first_of_identical_examples():
    records = [{"q": "a", "output": "x"}, {"q": "b", "output": "x"}, {"q": "a", "output": "x"}, {"output": "x", "q": "a"}]
    kept, report = apply_filters(records, [{"kind": "dedupe_exact"}], seed=0)
    assert kept == records[:2]  # key order does not matter
    assert [s.detail for s in report.steps[0].samples] == ["of #0", "of #0"]
    kept, report = apply_filters(records, [{"kind": "dedupe_exact", "fields": ["output"]}], seed=0)
    assert kept == records[:1]
    assert report.steps[0].reasons == {"exact duplicate": 3}


def test_near_dedupe_drops_a_one_word_edit_and_keeps_different_text():
    base = ("the quick brown fox jumps over the lazy dog while the farmer watches from the old wooden "
            "porch and drinks his morning coffee slowly before the long day of work begins in the fields")
    edited = base.replace("morning", "evening")  # 3 of 30 word-trigrams change: Jaccard 25/31 = 0.81
    other = "a completely different sentence about training small language models on persona chat data"
    records = outputs(base, other, edited, base.upper())
    spec = [{"kind": "dedupe_near", "field": "output", "threshold": 0.7, "seed": 1}]
    kept, report = apply_filters(records, spec, seed=0)
    assert kept_outputs(kept) == [base, other]
    assert report.steps[0].reasons == {"near duplicate": 2}
    details = [s.detail for s in report.steps[0].samples]
    assert details[0].startswith("of #0, jaccard ~0.") and float(details[0].rsplit("~")[1]) >= 0.7
    assert details[1] == "of #0, jaccard ~1.00"  # case is ignored
    strict = [{"kind": "dedupe_near", "field": "output", "threshold": 0.95, "seed": 1}]
    kept, _ = apply_filters(records, strict, seed=0)
    assert kept_outputs(kept) == [base, other, edited]


def test_near_dedupe_confirms_lsh_candidates_against_the_threshold():
    base = ("the quick brown fox jumps over the lazy dog while the farmer watches from the old wooden "
            "porch and drinks his morning coffee slowly before the long day of work begins in the fields")
    # 5 words replaced: true trigram Jaccard 19/45 = 0.42, MinHash estimate 0.49 (seed 1); LSH tuned to 0.5
    # still proposes it as a candidate, and the filter must not drop it
    far = base.replace("jumps", "a").replace("the lazy", "the b").replace("dog", "c").replace("the farmer", "the d")
    far = far.replace("from the old", "from e old")
    records = outputs(base, far)
    kept, report = apply_filters(records, [{"kind": "dedupe_near", "field": "output", "threshold": 0.5, "seed": 1}], seed=0)
    assert kept_outputs(kept) == [base, far]


# --------------------------------------------------------------------------------------- predicate
@pytest.fixture
def predicate_module(tmp_path, monkeypatch, request):
    """A user module on sys.path with keep_long(record) that counts its calls."""
    name = f"user_preds_{request.node.name.replace('[', '_').replace(']', '_')}"
    source = textwrap.dedent("""
        CALLS = []

        def keep_long(record):
            CALLS.append(record["output"])
            return len(record["output"]) > 3

        def broken(record):
            return None
    """)
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name, tmp_path / f"{name}.py"
    sys.modules.pop(name, None)


def test_predicate_keeps_what_the_user_function_accepts(predicate_module):
    name, _ = predicate_module
    kept, report = apply_filters(outputs("abc", "abcd", "abcdef"), [{"kind": "predicate", "path": f"{name}:keep_long"}], seed=0)
    assert kept_outputs(kept) == ["abcd", "abcdef"]
    assert report.steps[0].reasons == {f"{name}:keep_long returned False": 1}
    assert report.steps[0].name == f"predicate({name}:keep_long)"


def test_predicate_errors_name_the_problem(predicate_module):
    name, _ = predicate_module
    with pytest.raises(LmlabError, match=rf"^data.filters\[0\].path: {name}:broken returned NoneType for example 0; "
                                         r"it must return True \(keep\) or False \(drop\)$"):
        apply_filters(outputs("a"), [{"kind": "predicate", "path": f"{name}:broken"}], seed=0)
    with pytest.raises(LmlabError, match=rf"^data.filters\[0\].path: module '{name}' has no function 'nope'"):
        apply_filters(outputs("a"), [{"kind": "predicate", "path": f"{name}:nope"}], seed=0)
    with pytest.raises(LmlabError, match=r"^data.filters\[0\].path: cannot import module 'no_such_mod_xyz'"):
        apply_filters(outputs("a"), [{"kind": "predicate", "path": "no_such_mod_xyz:f"}], seed=0)


# ------------------------------------------------------------------------------------------- cache
def test_second_run_reads_every_step_from_the_cache_without_calling_the_predicate(predicate_module, tmp_path):
    name, _ = predicate_module
    module = __import__(name)
    records = outputs("abc", "abcd", "abcd", "abcdef", "x y *z")
    specs = [{"kind": "predicate", "path": f"{name}:keep_long"}, {"kind": "dedupe_exact"},
             {"kind": "balanced_markup", "field": "output"}]
    kept1, report1 = apply_filters(records, specs, seed=0, cache_dir=tmp_path / "cache")
    assert len(module.CALLS) == 5
    kept2, report2 = apply_filters(records, specs, seed=0, cache_dir=tmp_path / "cache")
    assert len(module.CALLS) == 5  # not called again
    assert kept1 == kept2 == [records[1], records[3]]
    assert [s.cached for s in report1.steps] == [False, False, False]
    assert [s.cached for s in report2.steps] == [True, True, True]
    d1, d2 = report1.to_dict(), report2.to_dict()
    for d in (d1, d2):
        for step in d["filters"]:
            step.pop("cached")
    assert d1 == d2
    assert len(list((tmp_path / "cache").glob("*.json"))) == 3


def test_cache_misses_when_data_spec_seed_or_predicate_source_change(predicate_module, tmp_path):
    name, path = predicate_module
    module = __import__(name)
    cache = tmp_path / "cache"
    records = outputs("abc", "abcd", "abcdef")
    pred = {"kind": "predicate", "path": f"{name}:keep_long"}
    median = {"kind": "median_length_drop", "field": "output", "lo": 0, "hi": 10}
    apply_filters(records, [pred, median], seed=0, cache_dir=cache)
    assert len(module.CALLS) == 3
    # a later step's change leaves the earlier step cached
    _, report = apply_filters(records, [pred, {**median, "hi": 11}], seed=0, cache_dir=cache)
    assert [s.cached for s in report.steps] == [True, False]
    # the run seed reaches only filters that use it; renaming a step does not change its result
    _, report = apply_filters(records, [{**pred, "name": "long enough"}, median], seed=1, cache_dir=cache)
    assert [s.cached for s in report.steps] == [True, False]
    assert report.steps[0].name == "long enough"
    assert len(module.CALLS) == 3
    # different data
    apply_filters(records + outputs("abcdefg"), [pred], seed=0, cache_dir=cache)
    assert len(module.CALLS) == 7
    # the user edits the predicate's module
    path.write_text(path.read_text() + "\n# edited\n")
    _, report = apply_filters(records, [pred], seed=0, cache_dir=cache)
    assert report.steps[0].cached is False
    assert len(module.CALLS) == 10


def test_token_count_cache_is_keyed_by_the_tokenizer(tmp_path):
    records = outputs("ab cd", "abcdef")
    spec = [{"kind": "token_count", "field": "output", "max": 2}]
    by_bytes, report = apply_filters(records, spec, seed=0, tokenizer=lambda t: list(t.encode()), cache_dir=tmp_path)
    assert (by_bytes, report.steps[0].cached) == ([], False)
    by_words, report = apply_filters(records, spec, seed=0, tokenizer=lambda t: [len(w) for w in t.split()],
                                     cache_dir=tmp_path)
    assert (by_words, report.steps[0].cached) == (records, False)
    _, report = apply_filters(records, spec, seed=0, tokenizer=lambda t: [len(w) for w in t.split()], cache_dir=tmp_path)
    assert report.steps[0].cached is True


def test_fingerprint_depends_on_content_and_order_not_key_order():
    assert fingerprint([{"a": 1, "b": 2}]) == fingerprint([{"b": 2, "a": 1}])
    assert fingerprint(outputs("x", "y")) != fingerprint(outputs("y", "x"))


# ------------------------------------------------------------------------------------------ report
def test_report_funnel_dict_and_lines():
    records = outputs("one", "one two", "*one two", "one two", "one two three " * 60)
    specs = [{"kind": "word_count", "field": "output", "min": 2, "name": "min 2 words"},
             {"kind": "balanced_markup", "field": "output"},
             {"kind": "dedupe_exact", "fields": ["output"]},
             {"kind": "word_count", "field": "output", "max": 100}]
    kept, report = apply_filters(records, specs, seed=0)
    assert isinstance(report, FilterReport)
    assert kept_outputs(kept) == ["one two"]
    assert report.funnel == [("input", 5), ("min 2 words", 4), ("balanced_markup(output)", 3),
                             ("dedupe_exact(output)", 2), ("word_count(output)", 1)]
    d = json.loads(json.dumps(report.to_dict()))
    assert (d["input"], d["kept"], d["dropped"]) == (5, 1, 4)
    assert d["filters"][1] == {
        "name": "balanced_markup(output)", "kind": "balanced_markup", "input": 4, "kept": 3, "dropped": 1,
        "reasons": {"unbalanced *": 1},
        "samples": [{"index": 2, "reason": "unbalanced *", "detail": "1 x *", "text": "*one two"}],
        "cached": False,
    }
    long_sample = d["filters"][3]["samples"][0]["text"]
    assert len(long_sample) == 160 and long_sample.endswith("...")
    assert report.lines() == [
        "filters: 5 -> 1 examples (4 dropped, 80.0%)",
        "  1. min 2 words: 5 -> 4 (-1)",
        "       1 x has fewer than 2 words",
        '       e.g. #0 [1 words] "one"',
        "  2. balanced_markup(output): 4 -> 3 (-1)",
        "       1 x unbalanced *",
        '       e.g. #2 [1 x *] "*one two"',
        "  3. dedupe_exact(output): 3 -> 2 (-1)",
        "       1 x exact duplicate",
        '       e.g. #3 [of #1] "one two"',
        "  4. word_count(output): 2 -> 1 (-1)",
        "       1 x has more than 100 words",
        f'       e.g. #4 [180 words] {json.dumps(long_sample)}',
    ]


def test_no_filters_keeps_everything():
    records = outputs("a", "b")
    kept, report = apply_filters(records, [], seed=0)
    assert kept == records
    assert (report.input, report.kept, report.dropped, report.funnel) == (2, 2, 0, [("input", 2)])
