"""A single-process GPTModel's forward over new tokens with an MLA cache, and its MTP module's.

`CachedDecoder.forward(ids)` runs Megatron's own modules on the new tokens only: the embedding,
every decoder `TransformerLayer` (its norms, residual adds and MLP, dense or MoE: they are
position-wise) with its `self_attention` swapped, for the call, for `latent_cache.CachedMLA`
(attention over the cache), then the decoder's final norm and the output layer. Prefill is one
call over the prompt; decoding calls it with one token, or two when verifying an MTP draft.

`CachedDecoder.mtp_forward(h, next_ids)` is the MTP module's forward (report §2.2, as
`MultiTokenPredictionLayer` computes it in training) at new positions j: eh_proj([enorm(Emb(t_{j+1}));
hnorm(h_j)]) -> its transformer layer, whose attention runs over the MTP layer's own latent cache
-> its final norm -> the shared output head; logits [B, T, V] for t_{j+2}. h_j is the main
model's last hidden state (after the decoder's final norm, what the MTP block receives).
Upstream's `GPTModel.compute_mtp_single_step` (`forward_single_position`) runs the MTP layer
with no cache, its attention seeing only the new positions, not the training forward's; this one
keeps the MTP layer's inputs' latents so that the draft equals the training forward's logits.

`truncate(n)` drops the cache entries from position n on (rejected drafts).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from megatron_dsv3.generate.latent_cache import CachedMLA, FullKVCache, LatentCache, Rope, bytes_per_token_per_layer


@contextmanager
def _attention_over(layer, cache, index: int, start: int, rope: Rope):
    original = layer._modules["self_attention"]
    layer._modules["self_attention"] = CachedMLA(original, cache, index, start, rope)
    try:
        yield
    finally:
        layer._modules["self_attention"] = original


def check_single_process(model) -> None:
    """The cached forward needs the whole model in this process, without tensor parallelism."""
    c = model.config
    if not (model.pre_process and model.post_process):
        raise ValueError("the cached forward needs the whole model (pre_process and post_process): build it with specs.gpt_model")
    for field in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size"):
        if getattr(c, field) != 1:
            raise ValueError(f"{field}={getattr(c, field)}: the cached forward runs one process. Fix: build the model with {field}=1.")
    if c.sequence_parallel:
        raise ValueError("sequence_parallel=True: the cached forward runs one process. Fix: set sequence_parallel=False.")


class CachedDecoder:
    """Cached forwards of `model` (a GPTModel of specs.gpt_model, single process, in eval mode).

    absorb: the latent cache (c^KV, k^R) with W^UK / W^UV absorbed; else per-head K and V.
    mtp: also keep the MTP layer's cache (speculative decoding).
    """

    def __init__(self, model, max_len: int, absorb: bool = True, mtp: bool = False, batch: int = 1):
        check_single_process(model)
        if absorb and (model.config.fp8_blockwise or model.config.fp8):
            raise ValueError("fp8_blockwise / fp8 is set: the absorbed attention multiplies by linear_kv_up_proj's weight "
                             "itself, which FP8 linears would quantise with their input. Fix: build the model without FP8 "
                             "(generate.loading.generation_config), or absorb=False.")
        if mtp and not getattr(model, "mtp_process", False):
            raise ValueError("mtp=True, but the model has no MTP module (mtp_num_layers is unset). "
                             "Fix: decode without speculation, or use a preset with mtp_num_layers=1.")
        self.model = model.eval()
        self.max_len = max_len
        self.layers = list(model.decoder.layers)
        parameter = model.embedding.word_embeddings.weight
        self.dtype, self.device = parameter.dtype, parameter.device
        self.rope = Rope.of(self.layers[0].self_attention, max_len)
        kind = LatentCache if absorb else FullKVCache
        self.cache = kind(model.config, len(self.layers), batch, max_len, self.dtype, self.device)
        self.mtp_layer = model.mtp.layers[0] if mtp else None
        self.mtp_cache = kind(model.config, 1, batch, max_len, self.dtype, self.device) if mtp else None

    @property
    def length(self) -> int:
        """Positions in the main cache."""
        return self.cache.length

    def bytes_per_token_per_layer(self) -> int:
        return bytes_per_token_per_layer(self.cache)

    def _check_room(self, cache, count: int) -> int:
        start = cache.length
        if start + count > self.max_len:
            raise ValueError(f"the cache holds {self.max_len} positions; {start} + {count} new ones do not fit")
        return start

    @torch.inference_mode()
    def forward(self, ids_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [B, T, V], last hidden states after the final norm [T, B, H]) of new tokens."""
        T = ids_BT.shape[1]
        start = self._check_room(self.cache, T)
        positions = torch.arange(start, start + T, device=self.device).expand_as(ids_BT)
        h = self.model.embedding(input_ids=ids_BT, position_ids=positions)  # [T, B, H]
        for index, layer in enumerate(self.layers):
            with _attention_over(layer, self.cache, index, start, self.rope):
                h, _ = layer(h, attention_mask=None)
        h = self.model.decoder.final_layernorm(h)
        logits, _ = self.model.output_layer(h)
        self.cache.length = start + T
        return logits.transpose(0, 1), h

    @torch.inference_mode()
    def mtp_forward(self, hidden_TBH: torch.Tensor, next_ids_BT: torch.Tensor) -> torch.Tensor:
        """MTP logits [B, T, V] (each for the token after next) at the next T MTP positions j, from
        the main model's hidden states h_j [T, B, H] and the tokens t_{j+1} [B, T]."""
        mtp = self.mtp_layer
        T = next_ids_BT.shape[1]
        start = self._check_room(self.mtp_cache, T)
        positions = torch.arange(start, start + T, device=self.device).expand_as(next_ids_BT)
        e = self.model.embedding(input_ids=next_ids_BT, position_ids=positions)
        x, _ = mtp.eh_proj(torch.cat([mtp.enorm(e), mtp.hnorm(hidden_TBH)], dim=-1))
        with _attention_over(mtp.mtp_model_layer, self.mtp_cache, 0, start, self.rope):
            x, _ = mtp.mtp_model_layer(x, attention_mask=None)
        logits, _ = self.model.output_layer(mtp.final_layernorm(x))
        self.mtp_cache.length = start + T
        return logits.transpose(0, 1)

    def truncate(self, length: int, mtp_length: int | None = None) -> None:
        """Forget the main cache from position `length` on (and the MTP cache's from `mtp_length`)."""
        self.cache.length = min(self.cache.length, length)
        if mtp_length is not None:
            self.mtp_cache.length = min(self.mtp_cache.length, mtp_length)

    def reset(self) -> None:
        self.cache.length = 0
        if self.mtp_cache is not None:
            self.mtp_cache.length = 0
