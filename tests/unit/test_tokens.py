"""The new-token rows: their gradients do not depend on how the CPU's threads split the work."""

from __future__ import annotations

import torch
from torch import nn

from nextgpt.tokens import NewTokenTable, TokenLayout

FIRST_NEW, WIDTH = 50, 32


def table() -> tuple[NewTokenTable, nn.Embedding]:
    torch.manual_seed(0)
    base = nn.Embedding(FIRST_NEW, WIDTH)
    layout = TokenLayout(
        first_new_id=FIRST_NEW,
        markers=("<Img>", "</Img>"),
        signals=tuple(f"[IMG{i}]" for i in range(4)),
        marker_ids={"image": (FIRST_NEW, FIRST_NEW + 1)},
        signal_ids={"image": tuple(range(FIRST_NEW + 2, FIRST_NEW + 6))},
    )
    return NewTokenTable(layout, base, nn.Linear(WIDTH, FIRST_NEW, bias=False)), base


def test_the_new_rows_gradients_are_the_same_on_every_run():
    """Stage 2 trains the signal rows, each read at many positions of a batch. Their gradient was
    summed from several threads at once (indexing's backward), so two runs of one seed drifted
    apart in the last bits and, over a few hundred steps, to other weights: bitwise equal here."""
    new_tokens, base = table()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, FIRST_NEW + 6, (64, 512), generator=gen)
    upstream = torch.randn(64, 512, WIDTH, generator=gen)
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        grads = []
        for _ in range(5):
            new_tokens.zero_grad(set_to_none=True)
            (new_tokens.embed(ids, base) * upstream).sum().backward()
            grads.append(torch.cat([new_tokens.markers.embed.grad, new_tokens.signals.embed.grad]))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(g, grads[0]) for g in grads[1:])
    # and they are the sums they should be: each row's upstream gradients at its positions
    is_new = ids >= FIRST_NEW
    expected = torch.zeros(6, WIDTH, dtype=torch.float64)
    expected.index_add_(0, (ids[is_new] - FIRST_NEW), upstream[is_new].double())
    torch.testing.assert_close(grads[0].double(), expected, rtol=1e-5, atol=1e-4)
