"""Next-token choice: greedy, or sampling with temperature and top-p; and the speculative-sampling
acceptance rule (Leviathan et al. 2023, Chen et al. 2023) that keeps the output distribution of
plain sampling when a draft distribution q proposes the token and the target p verifies it.

Ours: upstream's sampling (`megatron.core.inference.sampling`) runs inside its dynamic engine
(CUDA graphs, Triton), and its MTP verification accepts a draft only when it equals the token the
main model sampled, not by the rejection rule below.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    """temperature 0: greedy (argmax); else softmax(logits / temperature) cut to the top-p nucleus."""

    temperature: float = 1.0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"--temperature {self.temperature}: must be >= 0 (0: greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p {self.top_p}: must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def probabilities(self, logits_V: torch.Tensor) -> torch.Tensor:
        """The distribution a token is drawn from (fp32, sums to 1); one-hot at the argmax when greedy."""
        logits_V = logits_V.float()
        if self.greedy:
            return torch.nn.functional.one_hot(logits_V.argmax(), logits_V.shape[-1]).float()
        probs = (logits_V / self.temperature).softmax(dim=-1)
        if self.top_p < 1:
            sorted_probs, order = probs.sort(descending=True)
            before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the tokens ranked above
            sorted_probs[before >= self.top_p] = 0  # keep the smallest prefix reaching top_p
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
            probs /= probs.sum()
        return probs

    def choose(self, logits_V: torch.Tensor, generator: torch.Generator | None) -> tuple[int, torch.Tensor]:
        """(token, the distribution it was drawn from)."""
        probs = self.probabilities(logits_V)
        if self.greedy:
            return int(logits_V.argmax()), probs
        return int(torch.multinomial(probs, 1, generator=generator)), probs


def verify_draft(draft: int, q_V: torch.Tensor, p_V: torch.Tensor, sampling: Sampling,
                 generator: torch.Generator | None) -> tuple[bool, int]:
    """(accepted, the token emitted at the draft's place): the draft (drawn from q) is kept with
    probability min(1, p/q); otherwise a token is drawn from norm(max(p - q, 0)). The emitted token is
    then distributed as p exactly. Greedy (both one-hot): kept iff it is p's argmax."""
    if sampling.greedy:
        target = int(p_V.argmax())
        return draft == target, target
    u = torch.rand((), generator=generator, device=p_V.device)
    if u * q_V[draft] <= p_V[draft]:
        return True, draft
    residual = (p_V - q_V).clamp(min=0)
    total = residual.sum()
    if total <= 0:  # p == q up to rounding: any rejection was rounding; p itself is the answer
        residual, total = p_V, p_V.sum()
    return False, int(torch.multinomial(residual / total, 1, generator=generator))
