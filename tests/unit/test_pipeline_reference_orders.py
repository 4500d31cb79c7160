"""Our DualPipeV and DualPipe orders against the public deepseek-ai/DualPipe schedule.

The orders below were transcribed from the public DualPipe implementation
(https://github.com/deepseek-ai/DualPipe, MIT, commit 3da1bbea53606543d7f5f232338fc58096db30e3),
NOT computed by our code: its `DualPipeV.step` / `DualPipe.step` (dualpipe/dualpipev.py,
dualpipe/dualpipe.py) were replayed unchanged, one rank at a time, with the compute methods
(`_forward_compute_chunk`, `_backward_compute_chunk`, `_forward_backward_compute_chunk`,
`_weight_chunk`) replaced by recorders and the P2P methods by no-ops; the result was checked
by eye against the README figures (images/dualpipev.png: 4 ranks, 10 micro-batches;
images/dualpipe.png: 8 ranks, 20 micro-batches, whose reverse direction has no ids drawn).

Their notation mapped to ours (schedule.py's design note):
  phase p               chunk p. DualPipeV: phase 0 is stage r (the way down), phase 1 stage
                        2P-1-r. DualPipe: the *internal* phase (`phase ^ is_in_second_half`,
                        as their compute code indexes `self.module`): 0 is direction 0, entered
                        on rank 0, 1 is direction 1, entered on rank P-1.
  chunk id i            micro-batch i; for DualPipe's phase 1 (direction 1), micro-batch M/2 + i.
  _forward_chunk        F
  _backward_chunk       B with enable_zb=True (its W queued in WeightGradStore), else BW
  _weight_chunk         W of the oldest queued B (WeightGradStore is first in, first out)
  _forward_backward_chunk(p0, p1)   F{p0}.i&B{p1}.j (the backward is a full one)
"""

import pytest

from megatron_dsv3.pipeline import schedule

# fmt: off
DUALPIPEV_4_RANKS_10_MICROBATCHES = [
    [  # rank 0
        "F0.0", "F0.1", "F0.2", "F0.3", "F0.4", "F0.5", "F0.6", "F1.0",
        "B1.0", "W1.0", "F1.1", "B1.1", "W1.1", "F1.2", "B1.2", "W1.2",
        "F1.3", "F0.7&B1.3", "F1.4&B0.0", "F0.8&B1.4", "F1.5&B0.1", "F0.9&B1.5", "F1.6&B0.2", "BW1.6",
        "F1.7&B0.3", "BW1.7", "F1.8&B0.4", "BW1.8", "F1.9&B0.5", "BW1.9", "B0.6", "W0.6",
        "B0.7", "W0.7", "B0.8", "W0.8", "B0.9", "W0.9",
    ],
    [  # rank 1
        "F0.0", "F0.1", "F0.2", "F0.3", "F0.4", "F1.0", "F0.5", "F1.1",
        "B1.0", "W1.0", "F1.2", "B1.1", "W1.1", "F1.3", "F0.6&B1.2", "F1.4&B0.0",
        "F0.7&B1.3", "F1.5&B0.1", "F0.8&B1.4", "F1.6&B0.2", "F0.9&B1.5", "F1.7&B0.3", "BW1.6", "F1.8&B0.4",
        "BW1.7", "F1.9&B0.5", "BW1.8", "BW0.6", "B1.9", "B0.7", "W1.9", "B0.8",
        "W0.7", "B0.9", "W0.8", "W0.9",
    ],
    [  # rank 2
        "F0.0", "F0.1", "F0.2", "F1.0", "F0.3", "F1.1", "F0.4", "F1.2",
        "B1.0", "W1.0", "F1.3", "F0.5&B1.1", "F1.4&B0.0", "F0.6&B1.2", "F1.5&B0.1", "F0.7&B1.3",
        "F1.6&B0.2", "F0.8&B1.4", "F1.7&B0.3", "F0.9&B1.5", "F1.8&B0.4", "BW1.6", "F1.9&B0.5", "BW1.7",
        "BW0.6", "BW1.8", "B0.7", "B1.9", "B0.8", "W0.7", "B0.9", "W1.9",
        "W0.8", "W0.9",
    ],
    [  # rank 3
        "F0.0", "F1.0", "F0.1", "F1.1", "F0.2", "F1.2", "F0.3", "F1.3",
        "F0.4", "BW1.0", "F1.4&B0.0", "F0.5&B1.1", "F1.5&B0.1", "F0.6&B1.2", "F1.6&B0.2", "F0.7&B1.3",
        "F1.7&B0.3", "F0.8&B1.4", "F1.8&B0.4", "F0.9&B1.5", "F1.9&B0.5", "BW1.6", "BW0.6", "BW1.7",
        "BW0.7", "B1.8", "B0.8", "B1.9", "B0.9", "W1.8", "W0.8", "W1.9",
        "W0.9",
    ],
]

DUALPIPE_4_RANKS_8_MICROBATCHES = [
    [  # rank 0
        "F0.0", "F0.1", "F0.2", "F1.4", "B1.4", "W1.4", "F1.5", "F0.3&B1.5",
        "F1.6&B0.0", "BW1.6", "F1.7&B0.1", "BW1.7", "B0.2", "W0.2", "B0.3", "W0.3",
    ],
    [  # rank 1
        "F0.0", "F1.4", "F0.1", "F1.5", "F0.2", "BW1.4", "F1.6&B0.0", "F0.3&B1.5",
        "F1.7&B0.1", "BW1.6", "BW0.2", "B1.7", "B0.3", "W1.7", "W0.3",
    ],
    [  # rank 2
        "F1.4", "F0.0", "F1.5", "F0.1", "F1.6", "BW0.0", "F0.2&B1.4", "F1.7&B0.1",
        "F0.3&B1.5", "BW0.2", "BW1.6", "B0.3", "B1.7", "W0.3", "W1.7",
    ],
    [  # rank 3
        "F1.4", "F1.5", "F1.6", "F0.0", "B0.0", "W0.0", "F0.1", "F1.7&B0.1",
        "F0.2&B1.4", "BW0.2", "F0.3&B1.5", "BW0.3", "B1.6", "W1.6", "B1.7", "W1.7",
    ],
]

DUALPIPE_8_RANKS_20_MICROBATCHES = [
    [  # rank 0
        "F0.0", "F0.1", "F0.2", "F0.3", "F0.4", "F0.5", "F0.6", "F1.10",
        "B1.10", "W1.10", "F1.11", "B1.11", "W1.11", "F1.12", "B1.12", "W1.12",
        "F1.13", "F0.7&B1.13", "F1.14&B0.0", "F0.8&B1.14", "F1.15&B0.1", "F0.9&B1.15", "F1.16&B0.2", "BW1.16",
        "F1.17&B0.3", "BW1.17", "F1.18&B0.4", "BW1.18", "F1.19&B0.5", "BW1.19", "B0.6", "W0.6",
        "B0.7", "W0.7", "B0.8", "W0.8", "B0.9", "W0.9",
    ],
    [  # rank 1
        "F0.0", "F0.1", "F0.2", "F0.3", "F0.4", "F1.10", "F0.5", "F1.11",
        "B1.10", "W1.10", "F1.12", "B1.11", "W1.11", "F1.13", "F0.6&B1.12", "F1.14&B0.0",
        "F0.7&B1.13", "F1.15&B0.1", "F0.8&B1.14", "F1.16&B0.2", "F0.9&B1.15", "F1.17&B0.3", "BW1.16", "F1.18&B0.4",
        "BW1.17", "F1.19&B0.5", "BW1.18", "BW0.6", "B1.19", "B0.7", "W1.19", "B0.8",
        "W0.7", "B0.9", "W0.8", "W0.9",
    ],
    [  # rank 2
        "F0.0", "F0.1", "F0.2", "F1.10", "F0.3", "F1.11", "F0.4", "F1.12",
        "B1.10", "W1.10", "F1.13", "F0.5&B1.11", "F1.14&B0.0", "F0.6&B1.12", "F1.15&B0.1", "F0.7&B1.13",
        "F1.16&B0.2", "F0.8&B1.14", "F1.17&B0.3", "F0.9&B1.15", "F1.18&B0.4", "BW1.16", "F1.19&B0.5", "BW1.17",
        "BW0.6", "BW1.18", "B0.7", "B1.19", "B0.8", "W0.7", "B0.9", "W1.19",
        "W0.8", "W0.9",
    ],
    [  # rank 3
        "F0.0", "F1.10", "F0.1", "F1.11", "F0.2", "F1.12", "F0.3", "F1.13",
        "F0.4", "BW1.10", "F1.14&B0.0", "F0.5&B1.11", "F1.15&B0.1", "F0.6&B1.12", "F1.16&B0.2", "F0.7&B1.13",
        "F1.17&B0.3", "F0.8&B1.14", "F1.18&B0.4", "F0.9&B1.15", "F1.19&B0.5", "BW1.16", "BW0.6", "BW1.17",
        "BW0.7", "B1.18", "B0.8", "B1.19", "B0.9", "W1.18", "W0.8", "W1.19",
        "W0.9",
    ],
    [  # rank 4
        "F1.10", "F0.0", "F1.11", "F0.1", "F1.12", "F0.2", "F1.13", "F0.3",
        "F1.14", "BW0.0", "F0.4&B1.10", "F1.15&B0.1", "F0.5&B1.11", "F1.16&B0.2", "F0.6&B1.12", "F1.17&B0.3",
        "F0.7&B1.13", "F1.18&B0.4", "F0.8&B1.14", "F1.19&B0.5", "F0.9&B1.15", "BW0.6", "BW1.16", "BW0.7",
        "BW1.17", "B0.8", "B1.18", "B0.9", "B1.19", "W0.8", "W1.18", "W0.9",
        "W1.19",
    ],
    [  # rank 5
        "F1.10", "F1.11", "F1.12", "F0.0", "F1.13", "F0.1", "F1.14", "F0.2",
        "B0.0", "W0.0", "F0.3", "F1.15&B0.1", "F0.4&B1.10", "F1.16&B0.2", "F0.5&B1.11", "F1.17&B0.3",
        "F0.6&B1.12", "F1.18&B0.4", "F0.7&B1.13", "F1.19&B0.5", "F0.8&B1.14", "BW0.6", "F0.9&B1.15", "BW0.7",
        "BW1.16", "BW0.8", "B1.17", "B0.9", "B1.18", "W1.17", "B1.19", "W0.9",
        "W1.18", "W1.19",
    ],
    [  # rank 6
        "F1.10", "F1.11", "F1.12", "F1.13", "F1.14", "F0.0", "F1.15", "F0.1",
        "B0.0", "W0.0", "F0.2", "B0.1", "W0.1", "F0.3", "F1.16&B0.2", "F0.4&B1.10",
        "F1.17&B0.3", "F0.5&B1.11", "F1.18&B0.4", "F0.6&B1.12", "F1.19&B0.5", "F0.7&B1.13", "BW0.6", "F0.8&B1.14",
        "BW0.7", "F0.9&B1.15", "BW0.8", "BW1.16", "B0.9", "B1.17", "W0.9", "B1.18",
        "W1.17", "B1.19", "W1.18", "W1.19",
    ],
    [  # rank 7
        "F1.10", "F1.11", "F1.12", "F1.13", "F1.14", "F1.15", "F1.16", "F0.0",
        "B0.0", "W0.0", "F0.1", "B0.1", "W0.1", "F0.2", "B0.2", "W0.2",
        "F0.3", "F1.17&B0.3", "F0.4&B1.10", "F1.18&B0.4", "F0.5&B1.11", "F1.19&B0.5", "F0.6&B1.12", "BW0.6",
        "F0.7&B1.13", "BW0.7", "F0.8&B1.14", "BW0.8", "F0.9&B1.15", "BW0.9", "B1.16", "W1.16",
        "B1.17", "W1.17", "B1.18", "W1.18", "B1.19", "W1.19",
    ],
]
# fmt: on

CASES = [
    (schedule.dualpipev_order, schedule.dualpipev_placement, 4, 10, DUALPIPEV_4_RANKS_10_MICROBATCHES),
    (schedule.dualpipe_order, schedule.dualpipe_placement, 4, 8, DUALPIPE_4_RANKS_8_MICROBATCHES),
    (schedule.dualpipe_order, schedule.dualpipe_placement, 8, 20, DUALPIPE_8_RANKS_20_MICROBATCHES),
]
RANK_CASES = [
    pytest.param(build, p, m, reference, rank, id=f"{build.__name__}-P{p}-M{m}-rank{rank}")
    for build, _, p, m, reference in CASES
    for rank in range(p)
]


@pytest.mark.parametrize("build, p, m, reference, rank", RANK_CASES)
def test_order_is_the_public_dualpipe_schedule(build, p, m, reference, rank):
    assert len(reference) == p
    assert [str(action) for action in build(p, m)[rank]] == reference[rank]


@pytest.mark.parametrize("build, placement, p, m, reference", CASES, ids=lambda v: getattr(v, "__name__", None))
def test_the_public_schedule_passes_our_order_check(build, placement, p, m, reference):
    """Our checker accepts their order, read back from the strings, for our placement."""
    order = [[_parse(text) for text in rank] for rank in reference]
    schedule.check_order(order, placement(p, m))


def _parse(text: str) -> schedule.Action:
    if "&" in text:
        forward, backward = text.split("&")
        (chunk, microbatch), (b_chunk, b_microbatch) = (map(int, part[1:].split(".")) for part in (forward, backward))
        return schedule.Action("FB", chunk, microbatch, b_chunk, b_microbatch)
    kind = text.rstrip("0123456789.")
    chunk, microbatch = map(int, text[len(kind):].split("."))
    return schedule.Action(kind, chunk, microbatch)
