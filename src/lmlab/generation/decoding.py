"""Decoding a loaded checkpoint (lmlab.models.loading): batched generation with a sampling preset, streaming
token by token, contrastive search; stopping at EOS and at the template's end of turn; logging generations."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lmlab.data.sft import pad_token_id
from lmlab.errors import LmlabError
from lmlab.generation.prompts import prompt_ids, stop_strings
from lmlab.models.loading import LoadedCheckpoint, load_checkpoint
from lmlab.recipe.defaults import DEFAULT_WORKSPACE
from lmlab.recipe.generation import SamplingPreset, pick_preset
from lmlab.workspace.ledger import client

# ---------------------------------------------------------------------------------------- prompting


# ---------------------------------------------------------------------------------------- generation
@dataclass
class Generation:
    prompt: str  # the rendered prompt the model saw
    text: str  # what it generated, without EOS / the stop string
    stop_reason: str  # "eos", "stop" (a stop string) or "length" (max_new_tokens)
    n_tokens: int  # generated tokens, the EOS / stop tokens included

    def to_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "output": self.text, "stop_reason": self.stop_reason, "n_tokens": self.n_tokens}


def generate(loaded: LoadedCheckpoint, prompts: Sequence[str | Mapping[str, Any]], sampling: SamplingPreset, *,
             batch_size: int = 8) -> list[Generation]:
    """Generate a completion for every prompt (strings or records), in batches of left-padded prompts.
    Same preset (seed included) and batch size give the same texts."""
    return generate_encoded(loaded, [prompt_ids(loaded, p) for p in prompts], sampling, batch_size=batch_size)


def generate_encoded(loaded: LoadedCheckpoint, encoded: Sequence[tuple[str, list[int]]], sampling: SamplingPreset, *,
                     batch_size: int = 8) -> list[Generation]:
    """`generate` for prompts already rendered and tokenized, as (prompt text, token ids): `lmlab serve` renders
    chat messages and raw text itself."""
    import torch

    if not encoded:
        return []
    encoded = list(encoded)
    torch.manual_seed(sampling.seed)
    if sampling.mode == "contrastive":  # one prompt at a time: candidates are the batch
        return [_contrastive(loaded, text, ids, sampling) for text, ids in encoded]
    out: list[Generation] = []
    for start in range(0, len(encoded), batch_size):
        out += _generate_batch(loaded, encoded[start:start + batch_size], sampling)
    return out


def _eos_ids(loaded: LoadedCheckpoint) -> list[int]:
    ids = {loaded.tokenizer.eos_token_id}
    gen = getattr(loaded.model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None) if gen is not None else None
    ids.update(extra if isinstance(extra, list) else [extra])
    return sorted(i for i in ids if i is not None)


def _pad_id(loaded: LoadedCheckpoint) -> int:

    return pad_token_id(loaded.tokenizer)


def _device(model) -> Any:
    return next(model.parameters()).device


def _generate_batch(loaded: LoadedCheckpoint, encoded: list[tuple[str, list[int]]],
                    sampling: SamplingPreset) -> list[Generation]:
    import torch

    pad, eos = _pad_id(loaded), _eos_ids(loaded)
    width = max(len(ids) for _, ids in encoded)
    input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, (_, ids) in enumerate(encoded):  # left padding: every prompt ends where generation starts
        input_ids[i, width - len(ids):] = torch.tensor(ids)
        mask[i, width - len(ids):] = 1
    stops = stop_strings(loaded, sampling)
    device = _device(loaded.model)
    with torch.no_grad():
        out = loaded.model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                    generation_config=_generation_config(sampling, eos, pad, stops),
                                    tokenizer=loaded.tokenizer if stops else None)
    return [_finish(loaded, text, out[i, width:].tolist(), eos, stops) for i, (text, _) in enumerate(encoded)]


def _generation_config(sampling: SamplingPreset, eos: list[int], pad: int, stops: list[str]):
    """transformers' GenerationConfig for a greedy or sampling preset (contrastive search is `_contrastive`)."""
    from transformers import GenerationConfig

    settings: dict[str, Any] = {"max_new_tokens": sampling.max_new_tokens, "eos_token_id": eos,
                                "pad_token_id": pad, "repetition_penalty": sampling.repetition_penalty}
    if sampling.mode == "sample":
        settings.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p,
                        top_k=sampling.top_k or None)
    else:
        settings.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if stops:
        settings["stop_strings"] = stops
    return GenerationConfig(**settings)


def _finish(loaded: LoadedCheckpoint, prompt: str, new_ids: list[int], eos: list[int], stops: list[str]) -> Generation:
    """Cut the generated ids at the first EOS and the text at the first stop string; say which ended it.
    Rows that finished early are padded (often with EOS), so the first EOS is where this row stopped."""
    cut = next((i for i, t in enumerate(new_ids) if t in eos), None)
    ids = new_ids if cut is None else new_ids[:cut]
    text = loaded.tokenizer.decode(ids, skip_special_tokens=False)
    if (pos := first_stop(text, stops)) is not None:
        return Generation(prompt, text[:pos], "stop", len(ids))
    if cut is not None:
        return Generation(prompt, text, "eos", cut + 1)
    return Generation(prompt, text, "length", len(ids))


def stream_generate(loaded: LoadedCheckpoint, prompt: tuple[str, list[int]],
                    sampling: SamplingPreset) -> Iterator[str | Generation]:
    """Generate for one encoded prompt (prompt text, ids) while yielding its text as it is decoded: text pieces,
    then the finished Generation, whose text the pieces add up to. Same model.generate call, seed and stop
    criteria as `generate_encoded`, so the tokens are the same; a piece is held back while it could still be the
    start of a stop string (or half of a multi-byte character). Closing the iterator stops the generation."""
    import queue
    import threading

    import torch
    from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
    from transformers.generation.streamers import BaseStreamer

    text, ids = prompt
    if sampling.mode == "contrastive":  # its own loop; one piece
        torch.manual_seed(sampling.seed)
        done = _contrastive(loaded, text, ids, sampling)
        if done.text:
            yield done.text
        yield done
        return
    pad, eos, stops = _pad_id(loaded), _eos_ids(loaded), stop_strings(loaded, sampling)
    tokens: queue.Queue[list[int] | BaseException | None] = queue.Queue()  # None: generation ended
    cancel = threading.Event()

    class NewTokens(BaseStreamer):
        """generate() puts the prompt first, then each step's token (shape (1,)); end() when it stops."""

        prompt_seen = False

        def put(self, value):
            if self.prompt_seen:
                tokens.put(value.flatten().tolist())
            self.prompt_seen = True

        def end(self):
            tokens.put(None)

    class Cancelled(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool, device=input_ids.device)

    def run() -> None:
        device = _device(loaded.model)
        try:
            with torch.no_grad():
                loaded.model.generate(input_ids=torch.tensor([ids], device=device),
                                      attention_mask=torch.ones((1, len(ids)), dtype=torch.long, device=device),
                                      generation_config=_generation_config(sampling, eos, pad, stops),
                                      tokenizer=loaded.tokenizer if stops else None, streamer=NewTokens(),
                                      stopping_criteria=StoppingCriteriaList([Cancelled()]))
        except BaseException as e:  # handed to the reader, which raises it
            tokens.put(e)

    torch.manual_seed(sampling.seed)
    worker = threading.Thread(target=run, name="lmlab-stream", daemon=True)
    worker.start()
    new: list[int] = []
    sent = ""
    try:
        while (item := tokens.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            new += item
            settled = _settled_text(loaded, new, eos, stops)
            if len(settled) > len(sent):
                yield settled[len(sent):]
                sent = settled
        done = _finish(loaded, text, new, eos, stops)
        if len(done.text) > len(sent):
            yield done.text[len(sent):]
        yield done
    finally:
        cancel.set()
        worker.join()


def _settled_text(loaded: LoadedCheckpoint, new_ids: list[int], eos: list[int], stops: list[str]) -> str:
    """The part of the text so far that no later token can change: cut like `_finish`, minus a tail that may
    still grow into a stop string and a trailing replacement character (an incomplete UTF-8 sequence)."""
    cut = next((i for i, t in enumerate(new_ids) if t in eos), None)
    text = loaded.tokenizer.decode(new_ids if cut is None else new_ids[:cut], skip_special_tokens=False)
    if (pos := first_stop(text, stops)) is not None:
        return text[:pos]
    return text if cut is not None else settled(text, stops)


def first_stop(text: str, stops: list[str]) -> int | None:
    """Where the first of the stop strings starts in `text`, or None."""
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None


def settled(text: str, stops: list[str]) -> str:
    """Streamed text that no later token can change: without a trailing replacement character (the first bytes of
    a multi-byte character) and without a tail that may still grow into a stop string."""
    text = text.rstrip("\ufffd")
    held = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return text[:len(text) - held]


def _contrastive(loaded: LoadedCheckpoint, prompt: str, ids: list[int], sampling: SamplingPreset) -> Generation:
    """Contrastive search (Su et al., 2022; transformers 5 moved it to a hub download, so it lives here): of the
    top_k likeliest next tokens pick argmax (1-α)·p(v) − α·max_j cos(h_v, h_j), h = last hidden states of the
    context tokens j and of the candidate v. One forward of the k candidates per step, on a KV cache."""
    import torch
    import torch.nn.functional as F
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    model, k, alpha = loaded.model, sampling.top_k, sampling.penalty_alpha
    eos, stops = _eos_ids(loaded), stop_strings(loaded, sampling)
    penalty = RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty) if sampling.repetition_penalty != 1 else None
    device = _device(model)
    seq = torch.tensor([ids], device=device)
    new: list[int] = []
    with torch.no_grad():
        out = model(input_ids=seq, use_cache=True, output_hidden_states=True)
        cache, context_h = out.past_key_values, out.hidden_states[-1][0]  # (T, d)
        logits = out.logits[:, -1]  # (1, V)
        for _ in range(sampling.max_new_tokens):
            if penalty is not None:
                logits = penalty(seq, logits)
            probs, cand = F.softmax(logits.float(), dim=-1).topk(k)  # (1, k)
            cache.batch_repeat_interleave(k)
            length = seq.shape[1]
            step = model(input_ids=cand.view(k, 1), past_key_values=cache, use_cache=True, output_hidden_states=True,
                         attention_mask=torch.ones((k, length + 1), dtype=torch.long, device=device),
                         position_ids=torch.full((k, 1), length, dtype=torch.long, device=device))
            cand_h = step.hidden_states[-1][:, -1]  # (k, d)
            degeneration = F.cosine_similarity(cand_h[:, None, :].float(), context_h[None].float(), dim=-1).amax(-1)
            best = int(((1 - alpha) * probs[0] - alpha * degeneration).argmax())
            cache = step.past_key_values
            cache.batch_select_indices(torch.tensor([best], device=device))
            token = int(cand[0, best])
            new.append(token)
            seq = torch.cat([seq, cand[:, best:best + 1]], dim=1)
            context_h = torch.cat([context_h, cand_h[best:best + 1]], dim=0)
            logits = step.logits[best:best + 1, -1]
            if token in eos or (stops and any(s in loaded.tokenizer.decode(new[-16:]) for s in stops)):
                break
    return _finish(loaded, prompt, new, eos, stops)


# ------------------------------------------------------------------------------------------- ledger
def log_generations(loaded: LoadedCheckpoint, generations: Sequence[Generation], sampling: SamplingPreset,
                    preset: str) -> str | None:
    """Store the generations with the run in the ledger: `generations.json` (the latest, which `lmlab report`
    shows) and a dated copy `generations/<time>-<preset>.json`. Returns the dated artifact's path, or None when the
    checkpoint has no ledger run to attach them to."""
    if not loaded.run_id or not loaded.ledger_uri:
        return None

    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    artifact = f"generations/{stamp}-{preset}.json"
    payload = {"checkpoint": str(loaded.path), "preset": preset, "sampling": sampling.model_dump(),
               "samples": [g.to_dict() for g in generations]}
    try:
        c = client(loaded.ledger_uri)
        c.log_dict(loaded.run_id, payload, artifact)
        c.log_dict(loaded.run_id, payload, "generations.json")
    except Exception as e:  # e.g. a run deleted from the ledger: the generations themselves are fine
        raise LmlabError(f"ledger: could not log generations to run {loaded.run_id[:8]} ({e}); use --no-log") from None
    return artifact


def generate_side_by_side(refs: Sequence[str], prompts: Sequence[str | Mapping[str, Any]], *, preset: str | None,
                          overrides: Mapping[str, Any] | None = None, output_dir: str = DEFAULT_WORKSPACE,
                          batch_size: int = 8, log: bool = True) -> dict[str, Any]:
    """Run the same prompts through each run (one model in memory at a time) and log each run's generations.
    Returns {"labels": [...], "prompts": [...], "columns": [[Generation, ...] per run], "logged": [...],
    "presets": [the preset each run used: `preset`, else its recipe's generation.default_preset]}."""
    import gc

    labels, columns, logged, presets, shown = [], [], [], [], None
    for ref in refs:
        loaded = load_checkpoint(ref, output_dir=output_dir)
        sampling = pick_preset(loaded.recipe, preset, overrides)
        gens = generate(loaded, prompts, sampling, batch_size=batch_size)
        shown = shown or [g.prompt for g in gens]
        labels.append(loaded.label)
        columns.append(gens)
        presets.append(preset or getattr(getattr(loaded.recipe, "generation", None), "default_preset", "greedy"))
        logged.append(log_generations(loaded, gens, sampling, preset or "default") if log else None)
        del loaded
        gc.collect()
    return {"labels": labels, "prompts": shown or [], "columns": columns, "logged": logged, "presets": presets}
