"""The model side of `lmlab serve`: the `Backend` protocol the HTTP app talks to, the transformers backend (an lmlab
run / checkpoint with its saved template, stop strings and presets, or a plain Hugging Face folder) and loading it.
Another backend (a GGUF file on llama.cpp: lmlab.serve.gguf_backend) plugs in by implementing the same methods."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from lmlab.data.sft import special_prefix
from lmlab.data.templates import last_user_prompt
from lmlab.errors import LmlabError
from lmlab.generation.decoding import Generation, generate_encoded, stream_generate
from lmlab.generation.prompts import prompt_ids
from lmlab.models.loading import LoadedCheckpoint, load_checkpoint
from lmlab.models.merge import merged_model
from lmlab.recipe.defaults import DEFAULT_WORKSPACE
from lmlab.recipe.generation import SamplingPreset, pick_preset


class RequestError(Exception):
    """A request the server refuses, sent to the client in OpenAI's error format (HTTP 400 by default)."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status


@dataclass
class Completion:
    """What a backend generated for one request."""

    text: str  # without EOS / the stop string
    finish_reason: Literal["stop", "length"]  # OpenAI's: "stop" = EOS, end of turn or a stop string
    prompt_tokens: int
    completion_tokens: int  # the EOS / stop tokens included
    # which of the three ended it (lmlab's own detail, sent as `finish_detail`): EOS or an end-of-turn token,
    # a stop string, or the max_new_tokens limit (a model that never stops: the pad = eos trap)
    finish_detail: Literal["eos", "stop_string", "length"] = "eos"


class Backend(Protocol):
    """What the HTTP app needs from a model. The app makes one call at a time (it holds a lock around each, and
    around a whole stream). `messages` are {"role": system|user|assistant|tool, "content": str} dicts.
    Streams yield text pieces as they are decoded, then exactly one Completion whose text the pieces add up to.
    Requests the backend cannot serve (prompt too long, ...) raise RequestError."""

    model_id: str  # what /v1/models lists and every response names
    default_sampling: SamplingPreset  # requests start from this (max_new_tokens is max_tokens' default)

    def chat(self, messages: list[dict[str, str]], sampling: SamplingPreset) -> Completion: ...

    def complete(self, prompt: str, sampling: SamplingPreset) -> Completion: ...

    def chat_stream(self, messages: list[dict[str, str]], sampling: SamplingPreset) -> Iterator[str | Completion]: ...

    def complete_stream(self, prompt: str, sampling: SamplingPreset) -> Iterator[str | Completion]: ...


@dataclass
class TransformersBackend:
    """A transformers model: an lmlab checkpoint with its template (`recipe` set), or a plain Hugging Face folder
    (`recipe` None; chat goes through the tokenizer's chat template). Generation is lmlab.generate's."""

    loaded: LoadedCheckpoint
    model_id: str
    default_sampling: SamplingPreset
    notes: list[str] = field(default_factory=list)  # for the CLI to print (e.g. what --merge did)

    @property
    def plain(self) -> bool:
        return self.loaded.recipe is None

    def chat(self, messages: list[dict[str, str]], sampling: SamplingPreset) -> Completion:
        return self._generate(self.chat_prompt(messages), sampling, "messages")

    def complete(self, prompt: str, sampling: SamplingPreset) -> Completion:
        return self._generate(self.raw_prompt(prompt), sampling, "prompt")

    def chat_stream(self, messages: list[dict[str, str]], sampling: SamplingPreset) -> Iterator[str | Completion]:
        return self._stream(self.chat_prompt(messages), sampling, "messages")

    def complete_stream(self, prompt: str, sampling: SamplingPreset) -> Iterator[str | Completion]:
        return self._stream(self.raw_prompt(prompt), sampling, "prompt")

    # ------------------------------------------------------------------------------------ prompts
    def chat_prompt(self, messages: list[dict[str, str]]) -> tuple[str, list[int]]:
        """(prompt text, token ids) for chat messages; see the module docstring for the rule."""

        tok, template = self.loaded.tokenizer, self.loaded.template
        if self.plain:
            if not tok.chat_template:
                return self.raw_prompt(chat_as_prompt(messages))
            try:
                text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            except Exception as e:  # templates raise on conversations they refuse (e.g. a system message)
                raise RequestError(f"messages: the model's chat template refused them ({e})",
                                   param="messages") from None
            return text, tok(text, add_special_tokens=False)["input_ids"]  # the template writes BOS itself
        if template is not None and template.format == "chat":
            return prompt_ids(self.loaded, messages)
        return prompt_ids(self.loaded, chat_as_prompt(messages))

    def raw_prompt(self, text: str) -> tuple[str, list[int]]:
        """The text as is, after the tokenizer's special prefix (BOS), the way training starts a document."""

        tok = self.loaded.tokenizer
        ids = special_prefix(tok) + tok(text, add_special_tokens=False)["input_ids"]
        if tok.bos_token_id is not None and ids[:2] == [tok.bos_token_id] * 2:  # the text brought its own BOS
            del ids[0]
        return text, ids

    # --------------------------------------------------------------------------------- generation
    def _generate(self, prompt: tuple[str, list[int]], sampling: SamplingPreset, param: str) -> Completion:

        (done,) = generate_encoded(self.loaded, [prompt], self._fit(prompt, sampling, param), batch_size=1)
        return _completion(done, len(prompt[1]))

    def _stream(self, prompt: tuple[str, list[int]], sampling: SamplingPreset,
                param: str) -> Iterator[str | Completion]:

        pieces = stream_generate(self.loaded, prompt, self._fit(prompt, sampling, param))
        try:
            for item in pieces:
                yield item if isinstance(item, str) else _completion(item, len(prompt[1]))
        finally:
            pieces.close()  # stops the generation thread when the client goes away

    def _fit(self, prompt: tuple[str, list[int]], sampling: SamplingPreset, param: str) -> SamplingPreset:
        return fit_to_context(len(prompt[1]), context_length(self.loaded.model), sampling, param)


def fit_to_context(n: int, context: int | None, sampling: SamplingPreset, param: str) -> SamplingPreset:
    """Every backend's check of a prompt of n tokens: refuse an empty one or one that fills the context (None =
    unknown); shorten max_new_tokens to the room left."""
    if n == 0:
        raise RequestError(f"{param}: the prompt is empty", param=param)
    if context is None:
        return sampling
    if n >= context:
        raise RequestError(f"{param}: the prompt is {n} tokens; this model's context is {context} tokens",
                           param=param, code="context_length_exceeded")
    if sampling.max_new_tokens > context - n:
        sampling = sampling.model_copy(update={"max_new_tokens": context - n})
    return sampling


def _completion(g: Generation, prompt_tokens: int) -> Completion:
    detail = {"eos": "eos", "stop": "stop_string", "length": "length"}[g.stop_reason]
    return Completion(g.text, "length" if g.stop_reason == "length" else "stop", prompt_tokens, g.n_tokens, detail)


def chat_as_prompt(messages: Sequence[Mapping[str, str]]) -> str:
    """For models without a chat template: the last user message, after the system message(s) and a blank line
    (lmlab.data.templates.last_user_prompt); a conversation without a user message is refused."""
    try:
        return last_user_prompt(messages)
    except LmlabError as e:
        raise RequestError(str(e), param="messages") from None


def context_length(model: Any) -> int | None:
    """Positions the model was built for (learned or RoPE); None when its config does not say."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def load_backend(ref: str | Path, *, output_dir: str = DEFAULT_WORKSPACE, base: str | None = None, merge: bool = False,
                 preset: str | None = None, model_name: str | None = None) -> TransformersBackend:
    """A run id / prefix, run folder or checkpoint folder (best checkpoint, adapter applied, the run's template
    and presets), or a plain Hugging Face model folder (config.json without lmlab's recipe.yaml).
    merge: fold a LoRA adapter into its base (peft merge_and_unload) so each token costs one matmul less."""

    path, notes = Path(ref), []
    plain = path.is_dir() and not (path / "recipe.yaml").is_file()
    if plain and (path / "config.json").is_file():
        loaded = load_checkpoint(path)
        notes += [f"{flag}: ignored for a plain Hugging Face folder" for flag, given in
                  (("--merge", merge), ("--base", base is not None)) if given]
    elif plain and (path / "adapter_config.json").is_file():
        raise LmlabError(f"{ref}: a LoRA adapter without its lmlab recipe; serve the run it came from, or a "
                         "merged export (lmlab export RUN --merge -o DIR)")
    else:
        loaded = load_checkpoint(ref, output_dir=output_dir, base=base)
        if merge and loaded.adapter:
            merge_adapter(loaded)
            notes.append(f"--merge: LoRA adapter folded into its base ({loaded.base})")
        elif merge:
            notes.append("--merge: this checkpoint holds full weights; nothing to merge")
    sampling = pick_preset(loaded.recipe, preset)
    return TransformersBackend(loaded, model_name or default_model_id(loaded), sampling, notes)


def merge_adapter(loaded: LoadedCheckpoint) -> None:
    """Replace the peft model by its base with the adapter folded in (in place: no second copy in memory). QLoRA
    on a 4-bit base goes through export's path, which dequantizes the base first."""
    if loaded.recipe.adapter.kind == "qlora":

        loaded.model = merged_model(loaded)
    else:
        loaded.model = loaded.model.merge_and_unload().eval()


def default_model_id(loaded: LoadedCheckpoint) -> str:
    """'<run name>-<run id prefix>' for a run, the folder's name for a plain model."""
    if loaded.recipe is None:
        return loaded.path.resolve().name
    name = loaded.recipe.run.name
    return f"{name}-{loaded.run_id[:8]}" if loaded.run_id else name
