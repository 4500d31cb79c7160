"""The decoding loops: plain (one token per forward) and MTP speculative (report §2.2, §5.4.3).

Speculative decoding with DeepSeek-V3's one MTP module: after each main forward the MTP module
drafts the token after next from the main model's last hidden state h_j and the embedding of the
token t_{j+1} just chosen; the next main forward takes two tokens, the chosen one and the draft,
and its first logits verify the draft (`sampling.verify_draft`): accepted, the second logits give
one more token (two tokens for one forward); rejected, the verification gives the replacement
and the draft's cache entry is dropped. Greedy output is the plain loop's token for token;
sampled output keeps its distribution.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from megatron_dsv3.generate.decoder import CachedDecoder
from megatron_dsv3.generate.sampling import Sampling, verify_draft


@dataclass
class Stats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0  # the prompt's forward and the first token (with MTP: its prefill and first draft)
    decode_s: float = 0.0  # every token after the first
    prefill_cpu_s: float = 0.0  # the same two in this process's CPU time (time.process_time): on a shared
    decode_cpu_s: float = 0.0  # machine, what the work took rather than what the scheduler gave it
    main_forwards: int = 0  # after the prefill
    drafts: int = 0
    accepted: int = 0

    @property
    def decode_tokens_per_s(self) -> float:
        return (self.new_tokens - 1) / self.decode_s if self.decode_s > 0 and self.new_tokens > 1 else float("nan")

    @property
    def decode_tokens_per_cpu_s(self) -> float:
        return (self.new_tokens - 1) / self.decode_cpu_s if self.decode_cpu_s > 0 and self.new_tokens > 1 else float("nan")

    def clock(self, started: tuple[float, float], prefill: bool = False) -> None:
        """Set the prefill's (`prefill`) or the decoding's times so far, from `now()` at the start."""
        wall, cpu = time.perf_counter() - started[0], time.process_time() - started[1]
        if prefill:
            self.prefill_s, self.prefill_cpu_s = wall, cpu
        else:
            self.decode_s, self.decode_cpu_s = wall - self.prefill_s, cpu - self.prefill_cpu_s

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafts if self.drafts else float("nan")


def now() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _ids(tokens: list[int], device) -> torch.Tensor:
    return torch.tensor([tokens], dtype=torch.long, device=device)


def generate(decoder: CachedDecoder, prompt: list[int], max_new_tokens: int, sampling: Sampling = Sampling(0.0),
             generator: torch.Generator | None = None, speculative: bool = False, stop: frozenset[int] = frozenset(),
             stats: Stats | None = None) -> Iterator[int]:
    """Yield up to `max_new_tokens` tokens after `prompt` (stopping after a token in `stop`)."""
    stats = stats if stats is not None else Stats()
    if speculative and decoder.mtp_layer is None:
        raise ValueError("speculative decoding needs a CachedDecoder built with mtp=True")
    decoder.reset()
    stats.prompt_tokens, stats.new_tokens = len(prompt), 0
    if max_new_tokens <= 0:
        return
    loop = _speculative if speculative else _plain
    yield from loop(decoder, prompt, max_new_tokens, sampling, generator, stop, stats)


def _plain(decoder, prompt, max_new_tokens, sampling, generator, stop, stats):
    started = now()
    logits, _ = decoder.forward(_ids(prompt, decoder.device))
    token, _ = sampling.choose(logits[0, -1], generator)
    stats.clock(started, prefill=True)
    while True:
        stats.new_tokens += 1
        stats.clock(started)
        yield token
        if stats.new_tokens == max_new_tokens or token in stop:
            return
        logits, _ = decoder.forward(_ids([token], decoder.device))
        stats.main_forwards += 1
        token, _ = sampling.choose(logits[0, -1], generator)


def _speculative(decoder, prompt, max_new_tokens, sampling, generator, stop, stats):
    started = now()
    device = decoder.device
    logits, hidden = decoder.forward(_ids(prompt, device))
    token, _ = sampling.choose(logits[0, -1], generator)
    # MTP positions 0..P-1: (h_j, t_{j+1}); the last pairs the prompt's last state with the first new token
    draft_logits = decoder.mtp_forward(hidden, _ids(prompt[1:] + [token], device))
    draft, q = sampling.choose(draft_logits[0, -1], generator)
    stats.clock(started, prefill=True)
    new = [token]
    while True:
        for emitted in new:
            stats.new_tokens += 1
            stats.clock(started)
            yield emitted
            if stats.new_tokens == max_new_tokens or emitted in stop:
                return
        # verify: the last emitted token and the draft after it, at positions n-1 and n
        logits, hidden = decoder.forward(_ids([new[-1], draft], device))
        stats.main_forwards += 1
        stats.drafts += 1
        accepted, at_draft = verify_draft(draft, q, sampling.probabilities(logits[0, 0]), sampling, generator)
        if accepted:
            stats.accepted += 1
            bonus, _ = sampling.choose(logits[0, 1], generator)
            new = [draft, bonus]
        else:
            decoder.truncate(decoder.length - 1)  # the draft's entry
            new = [at_draft]
        draft_logits = decoder.mtp_forward(hidden[:len(new)], _ids(new, device))
        draft, q = sampling.choose(draft_logits[0, -1], generator)
