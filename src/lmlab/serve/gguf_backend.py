"""A GGUF file on llama.cpp (llama-cpp-python) as an `lmlab serve` backend: the same four calls as
lmlab.serve.TransformersBackend (chat, complete and their streaming forms), so `lmlab serve --gguf FILE` serves
what `lmlab export RUN --gguf` wrote, or any llama.cpp model.

Prompts follow serve's rules. A file `lmlab export --gguf` wrote carries its run's prompt template (lmlab.template):
chat messages are rendered by it exactly as `lmlab serve RUN` renders them (a chat template renders the
conversation; alpaca / prompt_completion / text answer the last user message, system messages prepended), and its
end of turn stops generation. Any other GGUF is a plain model: the file's chat template (tokenizer.chat_template,
with add_generation_prompt), or without one the last-user-message rule. Completions are the text as is, after BOS
when the file says to add one. Special tokens written in the text (<|im_start|>...) are parsed as such, as
transformers does. Requests start from the run's default sampling preset (lmlab.sampling), else greedy, unless
`preset` names a built-in one.

Decoding runs token by token on llama.cpp's sampler, so finish reasons and token counts mean what serve's other
backend means: it stops at an end-of-generation token (EOS, or an end of turn such as <|im_end|> that llama.cpp
marks), at a stop string, or at max_new_tokens; completion_tokens counts the EOS / stop tokens too. Sampling maps
onto llama.cpp's: temperature 0 = greedy, top_k 0 = off, top_p, no min_p (llama-cpp-python's default 0.05 would
cut tokens transformers keeps), seed. repetition_penalty is llama.cpp's, which looks at the last 64 tokens only
(transformers' looks at the whole text). Contrastive search has no llama.cpp counterpart and is refused.

llama-cpp-python is optional (`pip install 'lmlab[llama]'` compiles llama.cpp, ~6 minutes on 2 cores) and
imported only when a backend is made.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmlab.data.templates import PromptTemplate
from lmlab.errors import LmlabError
from lmlab.generation.decoding import first_stop, settled
from lmlab.generation.prompts import prompt_record
from lmlab.recipe.generation import BUILTIN_PRESETS, SamplingPreset
from lmlab.serve.backends import Completion, RequestError, chat_as_prompt, fit_to_context

INSTALL_HINT = "llama-cpp-python is not installed: pip install 'lmlab[llama]' (compiles llama.cpp, ~6 min)"


def import_llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError:
        raise LmlabError(INSTALL_HINT) from None
    return llama_cpp


@dataclass
class LlamaCppBackend:
    """One llama_cpp.Llama and the sampling requests start from. Make one with `LlamaCppBackend.load`."""

    llm: Any  # llama_cpp.Llama
    model_id: str
    default_sampling: SamplingPreset
    notes: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, path: str | os.PathLike, *, n_ctx: int = 0, logits_all: bool = False, n_threads: int | None = None,
             preset: str | None = None, model_name: str | None = None) -> LlamaCppBackend:
        """Load a GGUF file. n_ctx 0 = the context length the file states; logits_all keeps every position's
        logits (for `score`; costs n_ctx × vocab floats)."""
        path = Path(path)
        if not path.is_file():
            raise LmlabError(f"--gguf: {path} is not a file")
        llama_cpp = import_llama_cpp()
        if preset is not None and preset not in BUILTIN_PRESETS:
            raise LmlabError(f"--preset: unknown preset '{preset}'; one of {', '.join(BUILTIN_PRESETS)}")
        try:
            llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=logits_all, n_threads=n_threads,
                                  verbose=False)
        except ValueError as e:  # llama-cpp-python's "Failed to load model from file"
            raise LmlabError(f"--gguf: llama.cpp cannot load {path} ({e})") from None
        saved = llm.metadata.get("lmlab.sampling")
        sampling = BUILTIN_PRESETS[preset] if preset is not None else \
            SamplingPreset.model_validate_json(saved) if saved else BUILTIN_PRESETS["greedy"]
        return cls(llm, model_name or path.stem, sampling)

    # -------------------------------------------------------------------------------- the protocol
    def chat(self, messages: list[dict[str, str]], sampling: SamplingPreset) -> Any:
        return _last(self._generate(self.chat_prompt(messages), sampling, "messages"))

    def complete(self, prompt: str, sampling: SamplingPreset) -> Any:
        return _last(self._generate(self.raw_prompt(prompt), sampling, "prompt"))

    def chat_stream(self, messages: list[dict[str, str]], sampling: SamplingPreset) -> Iterator[Any]:
        return self._generate(self.chat_prompt(messages), sampling, "messages")

    def complete_stream(self, prompt: str, sampling: SamplingPreset) -> Iterator[Any]:
        return self._generate(self.raw_prompt(prompt), sampling, "prompt")

    # ------------------------------------------------------------------------------------ prompts
    @property
    def context(self) -> int:
        return self.llm.n_ctx()

    def tokenize(self, text: str, *, add_bos: bool) -> list[int]:
        """Token ids; add_bos adds BOS only when the file's tokenizer.ggml.add_bos_token says so."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    @property
    def run_template(self) -> tuple[bool, Any]:
        """(written by lmlab export, the run's PromptTemplate or None)."""

        spec = self.llm.metadata.get("lmlab.template")
        if spec is None:
            return False, None
        value = json.loads(spec)
        return True, PromptTemplate.from_dict(value) if value is not None else None

    def stop_strings(self, sampling: SamplingPreset) -> list[str]:
        """The request's stop strings and the run template's end of turn (unless it is EOS, which always stops)."""
        _, template = self.run_template
        end = template.end_of_turn() if template is not None else ""
        stops = list(sampling.stop)
        if end and end != self._spell(self.llm.token_eos()) and end not in stops:
            stops.append(end)
        return stops

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:

        from_run, run_template = self.run_template
        if from_run:
            return self._run_prompt(run_template, messages)
        template = self.llm.metadata.get("tokenizer.chat_template")
        if not template:
            return self.raw_prompt(chat_as_prompt(messages))
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        bos, eos = (self._spell(t) for t in (self.llm.token_bos(), self.llm.token_eos()))
        try:
            text = Jinja2ChatFormatter(template, eos_token=eos, bos_token=bos)(messages=messages).prompt
        except Exception as e:  # templates raise on conversations they refuse (e.g. a system message)
            raise RequestError(f"messages: the model's chat template refused them ({e})", param="messages") from None
        return self.tokenize(text, add_bos=False)  # the template writes BOS itself

    def _run_prompt(self, template: Any, messages: list[dict[str, str]]) -> list[int]:
        """As lmlab.generate.prompt_ids renders a run's prompt: chat templates the conversation, other formats
        the last user message (with system messages) as the prompt item."""

        if template is not None and template.format == "chat":
            try:
                text = template.render_for_generation(messages)
            except LmlabError as e:
                raise RequestError(f"messages: {e}", param="messages") from None
            return self.tokenize(text, add_bos=False)  # the template writes its special tokens itself
        item = chat_as_prompt(messages)
        if template is None or template.format == "text":
            return self.raw_prompt(item)
        try:
            return self.tokenize(template.render_for_generation(prompt_record(template, item)), add_bos=True)
        except LmlabError as e:
            raise RequestError(f"messages: {e}", param="messages") from None

    def _spell(self, token: int) -> str:
        return self.llm.detokenize([token], special=True).decode("utf-8", errors="replace") if token >= 0 else ""

    def raw_prompt(self, text: str) -> list[int]:
        return self.tokenize(text, add_bos=True)

    def score(self, ids: list[int]) -> Any:
        """Logits (positions × vocab, float32 numpy) of a token sequence; needs logits_all=True."""
        self.llm.reset()
        self.llm.eval(ids)
        return self.llm.scores[: len(ids)].copy()

    # --------------------------------------------------------------------------------- generation
    def _fit(self, ids: list[int], sampling: SamplingPreset, param: str) -> SamplingPreset:
        """Refuse an empty prompt, one that fills the context, or contrastive search; shorten max_new_tokens to
        the room left."""

        if sampling.mode == "contrastive":
            raise RequestError("contrastive search (penalty_alpha > 0) is not available on llama.cpp; use another "
                               "preset", param="penalty_alpha")
        return fit_to_context(len(ids), self.context, sampling, param)

    def _generate(self, ids: list[int], sampling: SamplingPreset, param: str) -> Iterator[Any]:
        """Text pieces as they settle, then one lmlab.serve.Completion whose text they add up to. A piece is held
        back while it could still grow into a stop string or is half a UTF-8 character."""

        llama_cpp = import_llama_cpp()
        sampling = self._fit(ids, sampling, param)
        vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self.llm.set_seed(sampling.seed)
        tokens = self.llm.generate(ids, top_k=sampling.top_k, top_p=sampling.top_p, min_p=0.0, typical_p=1.0,
                                   temp=sampling.temperature, repeat_penalty=sampling.repetition_penalty)
        stops = self.stop_strings(sampling)
        new: list[int] = []
        sent, detail = "", "length"
        try:
            for token in tokens:
                new.append(token)
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    detail = "eos"
                    text = self._text(new[:-1], ids)
                    break
                text = self._text(new, ids)
                cut = first_stop(text, stops)
                if cut is not None:
                    text, detail = text[:cut], "stop_string"
                    break
                if len(new) >= sampling.max_new_tokens:
                    break
                ready = settled(text, stops)
                if len(ready) > len(sent):
                    yield ready[len(sent):]
                    sent = ready
        finally:
            tokens.close()
        if not new:
            text = ""
        if len(text) > len(sent):
            yield text[len(sent):]
        yield Completion(text, "length" if detail == "length" else "stop", len(ids), len(new), detail)

    def _text(self, new: list[int], prompt: list[int]) -> str:
        return self.llm.detokenize(new, prev_tokens=prompt).decode("utf-8", errors="replace")

    def close(self) -> None:
        self.llm.close()


def _last(pieces: Iterator[Any]) -> Any:
    *_, done = pieces
    return done
