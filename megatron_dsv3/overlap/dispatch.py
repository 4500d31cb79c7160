"""Expert-parallel dispatch and combine as one all-to-all each, FP8 on the way to the experts.

Design note
-----------
Megatron's alltoall token dispatcher (`MoEAlltoAllTokenDispatcher`) sends a dispatch as two
all-to-alls, the permuted tokens and then their gate weights (probs), each through
`tensor_parallel.all_to_all`, which blocks until the data is there. `PackedAlltoAllDispatcher`
keeps everything of it (the routing metadata, both permutations, the split sizes, the CUDA
sync points, the shared-expert hooks) except those exchanges:
  - dispatch: one all-to-all whose rows are a token's bytes followed by its gate weight's,
    as DeepEP's dispatch carries a token with its weights;
  - combine: one all-to-all of the expert outputs;
  - backward: the reverse all-to-all of each one's gradients, packed the same way.
Precision (report §3.3, low-precision communication), with `fp8_blockwise` set: the two
exchanges that feed an expert's GEMMs travel as E4M3 codes with one power-of-2 FP32 scale per
1x128 tile (fp8/quant.py's quantiser), and are dequantised on arrival to the dtype they left
in, so the experts see exactly quantise-then-dequantise of their input:
  - the dispatch's tokens, the up-projections' input (their gate weights stay FP32);
  - the combine's gradient, which the down-projections' backward consumes (the report's
    "activation gradient before MoE down-projections").
The combine and the dispatch's gradient, forward and backward "combine components", stay in
the model's precision. The quantisation's own gradient is the identity (straight through).
Each exchange is issued asynchronously through overlap/link.py; before waiting for it, the
task hands over to the other micro-batch of an FB step (overlap/handover.py). Outside an FB
step the hand-over does nothing and the exchange is waited for at once.

Bytes moved are bytes: without FP8 the experts receive bit for bit what Megatron's two
all-to-alls deliver, and the gradients return bit for bit, so models train identically. With
one rank in the expert-parallel group nothing travels, and nothing is quantised (Megatron's
all-to-all is the identity there too).

`ExpertParallelMoELayer` is Megatron's MoELayer with this dispatcher in place of the alltoall
one (specs.py builds every MoE layer with it); other dispatchers are left as they are.
"""

from __future__ import annotations

import math

import torch
from megatron.core.transformer.moe.moe_layer import MoELayer, get_default_pg_collection
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

from megatron_dsv3.config import FP8_TILE
from megatron_dsv3.fp8.quant import FP8_DTYPE, BlockwiseFP8, quantize_1x128
from megatron_dsv3.overlap import handover, link

DISPATCH, COMBINE = "dispatch", "combine"
BACKWARD = " backward"


def _as_bytes(rows: torch.Tensor) -> torch.Tensor:
    """[n, ...] of any dtype -> [n, bytes per row] uint8 (a copy only if not contiguous)."""
    return rows.reshape(rows.shape[0], math.prod(rows.shape[1:])).contiguous().view(torch.uint8)


def _from_bytes(columns: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    return columns.contiguous().view(dtype).reshape(columns.shape[0], *shape)


class _Layout:
    """How the rows of some tensors [n, ...] are laid out as bytes, and back. With `fp8`, the
    first tensor is sent as E4M3 codes plus power-of-2 1x128 FP32 scales, returned dequantised."""

    def __init__(self, tensors: tuple[torch.Tensor, ...], fp8: bool):
        self.fp8 = fp8
        self.parts = [(t.dtype, tuple(t.shape[1:])) for t in tensors]

    def pack(self, tensors) -> torch.Tensor:
        columns = []
        for index, tensor in enumerate(tensors):
            if index == 0 and self.fp8:
                rows = tensor.detach().reshape(tensor.shape[0], math.prod(tensor.shape[1:]))
                quantised = quantize_1x128(rows, pow2_scale=True, name="the all-to-all's FP8 payload")
                columns += [_as_bytes(quantised.data), _as_bytes(quantised.scale)]
            else:
                columns.append(_as_bytes(tensor.detach()))
        return torch.cat(columns, dim=1)

    def unpack(self, payload: torch.Tensor) -> list[torch.Tensor]:
        tensors, offset = [], 0
        for index, (dtype, shape) in enumerate(self.parts):
            width = math.prod(shape)
            if index == 0 and self.fp8:
                tiles = -(-width // FP8_TILE)
                codes = _from_bytes(payload[:, offset: offset + width], FP8_DTYPE, (width,))
                offset += width
                scale = _from_bytes(payload[:, offset: offset + 4 * tiles], torch.float32, (tiles,))
                offset += 4 * tiles
                dequantised = BlockwiseFP8(codes, scale, (1, FP8_TILE), tuple(codes.shape)).dequantize(dtype)
                tensors.append(dequantised.reshape(payload.shape[0], *shape))
            else:
                nbytes = width * torch.empty((), dtype=dtype).element_size()
                tensors.append(_from_bytes(payload[:, offset: offset + nbytes], dtype, shape))
                offset += nbytes
        return tensors


def _exchange(payload: torch.Tensor, send_splits: list[int], receive_splits: list[int], group, label: str) -> torch.Tensor:
    """The all-to-all of `payload`'s rows, handing over to the other FB task while in flight."""
    received = payload.new_empty((sum(receive_splits), payload.shape[1]))
    transfer = link.all_to_all(received, payload, receive_splits, send_splits, group, label)
    handover.hand_over(label)
    transfer.wait()
    return received


class _RowExchange(torch.autograd.Function):
    """Rows of several tensors to the ranks of `group` in one all-to-all; the reverse for the
    gradients. `fp8` = (forward, backward): which direction sends its first tensor in FP8."""

    @staticmethod
    def forward(ctx, group, send_splits, receive_splits, label, fp8, *tensors):
        ctx.group, ctx.send_splits, ctx.receive_splits, ctx.label = group, send_splits, receive_splits, label
        ctx.layout = _Layout(tensors, fp8[1])
        layout = _Layout(tensors, fp8[0])
        return tuple(layout.unpack(_exchange(layout.pack(tensors), send_splits, receive_splits, group, label)))

    @staticmethod
    def backward(ctx, *grads):  # autograd materialises unused outputs' gradients as zeros
        payload = ctx.layout.pack(grads)
        returned = _exchange(payload, ctx.receive_splits, ctx.send_splits, ctx.group, ctx.label + BACKWARD)
        return (None, None, None, None, None, *ctx.layout.unpack(returned))


def exchange_rows(group, send_splits, receive_splits, *tensors: torch.Tensor, label: str,
                  fp8: tuple[bool, bool] = (False, False)) -> tuple[torch.Tensor, ...]:
    """Send rows of `tensors` ([n, ...], n = sum(send_splits)): send_splits[r] of them to rank r
    of `group`; returns what arrives, [sum(receive_splits), ...] each. Differentiable; `fp8`:
    whether the forward, and the backward, send the first tensor in FP8 (module note)."""
    if group.size() == 1:
        return tensors
    send_splits, receive_splits = [int(n) for n in send_splits], [int(n) for n in receive_splits]
    return _RowExchange.apply(group, send_splits, receive_splits, label, fp8, *tensors)


class PackedAlltoAllDispatcher(MoEAlltoAllTokenDispatcher):
    """Megatron's alltoall dispatcher with one all-to-all per dispatch and per combine (module note)."""

    @property
    def _fp8(self) -> bool:
        """FP8 on the exchanges that feed the experts' GEMMs (module note)."""
        return getattr(self.config, "fp8_blockwise", None) is not None

    def token_dispatch(self, permutated_local_input_tokens, permuted_probs):
        if self.shared_experts is not None:
            self.shared_experts.wait_current_stream()
        self.tokens_per_expert = self._maybe_dtoh_and_synchronize("before_ep_alltoall", self.tokens_per_expert)
        global_input_tokens, global_probs = exchange_rows(
            self.ep_group, self.input_splits, self.output_splits, permutated_local_input_tokens, permuted_probs,
            label=DISPATCH, fp8=(self._fp8, False),
        )
        if self.shared_experts is not None:
            self.shared_experts.linear_fc1_forward_and_act(global_input_tokens)
        return global_input_tokens, global_probs

    def token_combine(self, hidden_states, async_finish: bool = True, allocate_on_comm_stream: bool = True):
        if self.shared_experts is not None:
            self.shared_experts.wait_current_stream()
        (permutated_local_input_tokens,) = exchange_rows(self.ep_group, self.output_splits, self.input_splits, hidden_states,
                                                          label=COMBINE, fp8=(False, self._fp8))
        if self.shared_experts is not None:
            self.shared_experts.linear_fc2_forward(permutated_local_input_tokens)
            self.shared_experts.post_forward_comm()
        return permutated_local_input_tokens


class ExpertParallelMoELayer(MoELayer):
    """Megatron's MoELayer whose alltoall dispatcher is `PackedAlltoAllDispatcher`, and whose
    shared experts run in the MLP step: after the dispatch, just before the routed experts
    (report §3.2.1's chunk of attention / dispatch / MLP / combine). Upstream runs them before
    the router, in the attention step; inside an FB step, where the two micro-batches take
    turns at the all-to-alls, this moves their forward and backward into the segments that hide
    the other micro-batch's dispatch, which are otherwise the shorter ones. The values are
    the same; the gradient of the layer's normed input sums its three uses (shared experts,
    router, routed tokens) in another order than upstream's, as Megatron's own
    moe_shared_expert_overlap does. With moe_shared_expert_overlap set, Megatron's hooks run them."""

    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None, is_mtp_layer=False, name=None):
        if pg_collection is None:
            pg_collection = get_default_pg_collection()
        super().__init__(config, submodules=submodules, layer_number=layer_number, pg_collection=pg_collection,
                         is_mtp_layer=is_mtp_layer, name=name)
        if type(self.token_dispatcher) is MoEAlltoAllTokenDispatcher:
            self.token_dispatcher = PackedAlltoAllDispatcher(
                self.num_local_experts, self.local_expert_indices, config=self.config, pg_collection=pg_collection
            )
            if self.use_shared_expert and self.shared_expert_overlap:
                self.token_dispatcher.set_shared_experts(self.shared_experts)

    def _defers_shared_experts(self) -> bool:
        return self.use_shared_expert and not self.shared_expert_overlap

    def shared_experts_compute(self, hidden_states):
        if not self._defers_shared_experts():
            return super().shared_experts_compute(hidden_states)
        self._shared_experts_input = hidden_states  # computed in routed_experts_compute
        return None

    def routed_experts_compute(self, hidden_states, probs):
        if self._defers_shared_experts():
            self._shared_experts_output = super().shared_experts_compute(self._shared_experts_input)
            self._shared_experts_input = None
        return super().routed_experts_compute(hidden_states, probs)

    def postprocess(self, output, shared_expert_output):
        if self._defers_shared_experts():
            shared_expert_output, self._shared_experts_output = self._shared_experts_output, None
        return super().postprocess(output, shared_expert_output)
