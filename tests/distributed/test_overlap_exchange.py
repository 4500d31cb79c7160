"""The expert-parallel exchange (overlap/dispatch.py) and the emulated link (overlap/link.py) on
2 gloo processes, against references computed from the data itself.

Each rank makes its rows from a seed of its own, so either rank can rebuild the other's. Rank r
sends `SPLITS[r][d]` rows to rank d (zeros included: rank 1 sends nothing at all).
  - exchange: the rows that arrive are the sources' rows in rank order, bit for bit, and the
    backward returns every gradient row to its source, bit for bit (FP32, BF16); with FP8 on
    the way there (a dispatch), the tokens are fp8.quant's power-of-2 1x128
    quantise-then-dequantise of the source rows, their gate weights exact, and the gradients
    return exact (the quantisation passes them straight through); with FP8 on the way back (a
    combine's gradient) the values arrive exact and the gradients quantised-then-dequantised;
  - bytes: the link's counter of bytes sent to the other rank, per row, is the payload's
    formula: 4H + 4 (FP32 token and gate weight), 2H + 4 (BF16), H + 4 ceil(H / 128) + 4 (FP8);
  - emulated link: an all-to-all's wait returns no earlier than issue + bytes / bandwidth +
    latency, with max(bytes out, bytes in); a pipeline send arrives no earlier than the sender's
    issue + its bytes / bandwidth + latency; time spent waiting is counted as blocked.
"""

import math
import os
import time

import pytest
import torch
import torch.multiprocessing as mp

from megatron_dsv3.distributed import free_port

HIDDEN = 256
SPLITS = [[3, 5], [0, 0]]  # rank r sends SPLITS[r][d] rows to rank d (rank 1: none at all)
GBPS, LATENCY_US = 0.002, 3000.0  # 2 MB/s: 100 KB take 50 ms


# name, dtype, FP8 (forward, backward): a dispatch with FP8 tokens, a combine with an FP8 gradient
CASES = [("fp32", torch.float32, (False, False)), ("bf16", torch.bfloat16, (False, False)),
         ("fp8", torch.float32, (True, False)), ("fp8 gradient", torch.float32, (False, True))]


def _fp8_round_trip(rows: torch.Tensor) -> torch.Tensor:
    from megatron_dsv3.fp8.quant import quantize_1x128

    return quantize_1x128(rows, pow2_scale=True).dequantize(rows.dtype)


def _rows(rank: int, dtype: torch.dtype):
    generator = torch.Generator().manual_seed(100 + rank)
    n = sum(SPLITS[rank])
    tokens = (torch.randn(n, HIDDEN, generator=generator) * torch.logspace(-3, 3, HIDDEN)).to(dtype)
    probs = torch.rand(n, generator=generator)
    return tokens, probs


def _arriving(rank: int, source_rows) -> torch.Tensor:
    """What `rank` receives: each source's rows for it, sources in rank order."""
    parts = []
    for source, rows in enumerate(source_rows):
        start = sum(SPLITS[source][:rank])
        parts.append(rows[start: start + SPLITS[source][rank]])
    return torch.cat(parts)


def _worker(rank: int, port: int, out_dir: str):
    from megatron_dsv3.distributed import local_process_env
    from megatron_dsv3.overlap import link
    from megatron_dsv3.overlap.dispatch import exchange_rows

    local_process_env(rank, 2, port)
    torch.distributed.init_process_group("gloo")
    group = torch.distributed.new_group([0, 1])
    receive = [SPLITS[source][rank] for source in range(2)]
    report = {}
    for name, dtype, fp8 in CASES:
        link.reset()
        tokens, probs = (t.requires_grad_() for t in _rows(rank, dtype))
        got_tokens, got_probs = exchange_rows(group, SPLITS[rank], receive, tokens, probs, label="dispatch", fp8=fp8)
        sources = [_rows(source, dtype) for source in range(2)]
        want_tokens = _arriving(rank, [_fp8_round_trip(t) if fp8[0] else t for t, _ in sources])
        assert torch.equal(got_tokens, want_tokens) and got_tokens.dtype == dtype, name
        assert torch.equal(got_probs, _arriving(rank, [p for _, p in sources])), name
        # gradients: each receiver's rows of a known function of (receiver, position); back at the source
        grad_tokens = (torch.arange(got_tokens.numel(), dtype=torch.float32).reshape(got_tokens.shape) - 500) * 1.37 ** rank
        grad_tokens = grad_tokens.to(dtype)
        grad_probs = torch.arange(got_probs.numel(), dtype=torch.float32) + 0.5 + rank * 1000
        torch.autograd.backward([got_tokens, got_probs], [grad_tokens, grad_probs])
        if fp8[1]:  # what the source must get back: the receivers' gradients through FP8
            grad_tokens = _fp8_round_trip(grad_tokens)
        report[name] = {"tokens_grad": tokens.grad, "probs_grad": probs.grad, "grad_tokens": grad_tokens, "grad_probs": grad_probs,
                        "totals": link.totals()}

    # the emulated link: an all-to-all of known bytes, then one pipeline send
    link.emulate(link.LinkSpec(GBPS, LATENCY_US))
    link.reset()
    payload = torch.zeros(sum(SPLITS[rank]), 25_000, dtype=torch.uint8)  # 25 KB rows
    received = payload.new_empty(sum(receive), 25_000)
    torch.distributed.barrier()
    issued = time.time()
    link.all_to_all(received, payload, receive, SPLITS[rank], group, "dispatch").wait()
    report["all_to_all"] = {"took": time.time() - issued, "totals": link.totals()}
    tensor = torch.full((50_000,), float(rank))  # 200 KB
    torch.distributed.barrier()
    if rank == 0:
        issued = time.time()
        transfer = link.isend(tensor, dst=1, group=group)
        torch.distributed.send(torch.tensor([issued], dtype=torch.float64), dst=1)
        transfer.wait()
        report["p2p"] = {"totals": link.totals()}
    else:
        link.irecv(tensor, src=0, group=group).wait()
        arrived = time.time()
        issued = torch.empty(1, dtype=torch.float64)
        torch.distributed.recv(issued, src=0)
        report["p2p"] = {"took": arrived - float(issued), "value": float(tensor[0]), "totals": link.totals()}
    link.emulate(None)
    torch.save(report, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    out = tmp_path_factory.mktemp("exchange")
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(2)]


def _returned(reports, source: int, name: str, key: str) -> torch.Tensor:
    """The gradient rows every receiver holds for `source`'s rows (receivers in rank order):
    what must arrive back at `source`, row for row."""
    parts = []
    for receiver in range(2):
        grads = reports[receiver][name][key]
        start = sum(SPLITS[s][receiver] for s in range(source))
        parts.append(grads[start: start + SPLITS[source][receiver]])
    return torch.cat(parts)


@pytest.mark.parametrize("name", [name for name, _, _ in CASES])
def test_gradients_return_to_their_source_rows(reports, name):
    for rank in range(2):
        assert torch.equal(reports[rank][name]["tokens_grad"], _returned(reports, rank, name, "grad_tokens"))
        assert torch.equal(reports[rank][name]["probs_grad"], _returned(reports, rank, name, "grad_probs"))


FP32_ROW, BF16_ROW, FP8_ROW = 4 * HIDDEN + 4, 2 * HIDDEN + 4, HIDDEN + 4 * math.ceil(HIDDEN / 128) + 4


@pytest.mark.parametrize("name, forward_row, backward_row", [("fp32", FP32_ROW, FP32_ROW), ("bf16", BF16_ROW, BF16_ROW),
                                                             ("fp8", FP8_ROW, FP32_ROW), ("fp8 gradient", FP32_ROW, FP8_ROW)])
def test_the_link_counts_the_bytes_of_the_payload(reports, name, forward_row, backward_row):
    for rank in range(2):
        totals = reports[rank][name]["totals"]
        to_other, from_other = SPLITS[rank][1 - rank], SPLITS[1 - rank][rank]
        assert totals["dispatch"].rows_sent == to_other and totals["dispatch"].bytes_sent == to_other * forward_row
        assert totals["dispatch backward"].rows_sent == from_other
        assert totals["dispatch backward"].bytes_sent == from_other * backward_row


def test_an_emulated_all_to_all_takes_its_bytes_over_the_bandwidth_plus_latency(reports):
    for rank in range(2):
        rows = max(SPLITS[rank][1 - rank], SPLITS[1 - rank][rank])  # out or in, the larger
        least = rows * 25_000 / (GBPS * 1e9) + LATENCY_US * 1e-6
        report = reports[rank]["all_to_all"]
        assert least <= report["took"] < least + 0.5, (rank, least, report["took"])
        assert report["totals"]["dispatch"].blocked_s >= least * 0.95
        assert report["totals"]["dispatch"].comm_s == pytest.approx(least)  # its own time on the link


def test_an_emulated_pipeline_send_arrives_after_its_transfer_time(reports):
    report = reports[1]["p2p"]
    least = 200_000 / (GBPS * 1e9) + LATENCY_US * 1e-6
    assert report["value"] == 0.0 and least <= report["took"] < least + 0.5, report
    assert report["totals"]["p2p"].blocked_s >= least * 0.9
    assert reports[0]["p2p"]["totals"]["p2p"].bytes_sent == 200_000
