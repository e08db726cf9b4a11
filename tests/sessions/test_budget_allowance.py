"""The per-delta budget check's allowance: the same answer as pricing every token count."""

from __future__ import annotations

import random
from decimal import Decimal

from streams_service.llm.models import ModelInfo, Usage, cost_usd, load_catalog
from streams_service.sessions.runner import output_allowance


def _over(model: ModelInfo, cost: Decimal, input_tokens: int, remaining: Decimal, n: int) -> bool:
    """The check the allowance replaces, priced for n output tokens."""
    return cost + cost_usd(model, Usage(input_tokens=input_tokens, output_tokens=n)) > remaining


def test_the_allowance_is_the_largest_affordable_output() -> None:
    catalog = load_catalog()
    rng = random.Random(7)
    models = [catalog.get(m.id) for m in catalog.models]
    for _ in range(40):
        model = rng.choice(models)
        assert model is not None
        input_tokens = rng.choice([0, 12, 5_000, 250_000])
        cost = Decimal(rng.choice(["0", "0.0001", "0.01"]))
        remaining = Decimal(rng.choice(["0", "0.00005", "0.002", "0.05", "0.4"]))
        got = output_allowance(model, cost, input_tokens, remaining)
        case = (model.id, input_tokens, cost, remaining, got)
        # The boundary: n = got is affordable and got + 1 is not (or nothing is).
        assert _over(model, cost, input_tokens, remaining, got + 1), case
        if got >= 0:
            assert not _over(model, cost, input_tokens, remaining, got), case
        # And counts below it are affordable, counts above it not (spot checks).
        for n in {0, got // 3, got // 2, max(got - 1, 0)}:
            if 0 <= n <= got:
                assert not _over(model, cost, input_tokens, remaining, n), case
        for n in (got + 2, got * 2 + 5):
            assert _over(model, cost, input_tokens, remaining, n), case


def test_no_allowance_when_the_input_alone_is_over_budget() -> None:
    model = load_catalog().default_model
    assert output_allowance(model, Decimal(0), 1_000_000, Decimal("0.000001")) == -1
