"""One :class:`Capture` over several forwards: :meth:`Capture.pop` hands over what the forwards so far recorded, and
the next forward fills a fresh record (not the one already handed over)."""

from __future__ import annotations

import pytest
import torch

from pdelightning.adapters import resolve
from pdelightning.probing.batch import call_model
from pdelightning.probing.capture import Capture, Captured, Request
from tests.helpers.zoo import family

REQUEST = Request(hidden=True, sublayers=True, attention=True, embedding=True)


def _once(adapter, targets, module, batch) -> Captured:  # type: ignore[no-untyped-def]
    with torch.no_grad(), Capture(adapter, targets, REQUEST) as cap:
        call_model(module, batch)
        return cap.pop()


def _same(a: Captured, b: Captured) -> None:
    for bucket in ("hidden", "attention", "resid_pre", "attn_out", "mlp_out"):
        x, y = getattr(a, bucket), getattr(b, bucket)
        assert x.keys() == y.keys(), bucket
        for k in x:
            torch.testing.assert_close(x[k], y[k], rtol=0, atol=0)
    torch.testing.assert_close(a.embedding, b.embedding, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["ours", "torch"])
def test_pop_then_a_second_forward_fills_a_fresh_record(name: str) -> None:
    module, _, val = family(name)
    module.eval()
    it = iter(val)
    first, second = next(it), next(it)
    adapter, targets = resolve(module, need=("layers", "attention"))
    alone_first = _once(adapter, targets, module, first)
    alone_second = _once(adapter, targets, module, second)
    assert alone_first.hidden and alone_first.mlp_out, "the request must record hidden states and sublayers"
    assert not torch.equal(next(iter(alone_first.hidden.values())), next(iter(alone_second.hidden.values())))
    with torch.no_grad(), Capture(adapter, targets, REQUEST) as cap:
        call_model(module, first)
        got_first = cap.pop()
        call_model(module, second)
        got_second = cap.pop()
    _same(got_second, alone_second)  # the second forward's layers are in the second record ...
    _same(got_first, alone_first)  # ... and the first record was not overwritten by it
