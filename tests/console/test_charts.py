"""Dashboard arithmetic: money strings become numbers, error rates, cache savings from the
catalog's prices, rejection counts per bucket, upstream headroom."""

from __future__ import annotations

from console.charts import cache_savings, headroom, per_bucket, usage_frame
from console.client import Models

CATALOG = Models.model_validate(
    {
        "models": [
            {
                "id": "m",
                "display_name": "M",
                "prices": {
                    "bands": [
                        {
                            "max_total_input_tokens": None,
                            "input": "3.00",
                            "output": "15.00",
                            "cache_read": "0.30",
                            "cache_write_5m": "3.75",
                            "cache_write_1h": "6.00",
                        }
                    ]
                },
            }
        ]
    }
)


def test_usage_frame_and_cache_savings() -> None:
    rows = [
        {"day": "2026-11-01T00:00:00Z", "model": "m", "input_tokens": 10, "output_tokens": 5,
         "cache_read_tokens": 1_000_000, "cost_usd": "0.5", "generations": 4, "errors": 1},
        {"day": "2026-11-02T00:00:00Z", "model": "m", "input_tokens": 0, "output_tokens": 0,
         "cache_read_tokens": 500_000, "cost_usd": "0", "generations": 0, "errors": 0},
    ]  # fmt: skip
    frame = usage_frame(rows)
    assert list(frame["cost_usd"]) == [0.5, 0.0]
    assert list(frame["tokens"]) == [15, 0]
    assert list(frame["error_rate"]) == [0.25, 0.0]  # no generations: 0, not a division error
    saved = cache_savings(frame, CATALOG)
    # 1.5 M cached tokens at (3.00 - 0.30) USD per M instead of full input price.
    assert saved.to_dict("records") == [
        {"model": "m", "cache_read_tokens": 1_500_000, "saved_usd": 4.05}
    ]


def test_per_bucket_counts_and_headroom() -> None:
    counts = per_bucket(
        ["2026-11-01T10:05:00Z", "2026-11-01T10:55:00Z", "2026-11-01T11:00:00Z"],
        ["a", "a", "b"],
        "hour",
    )
    assert [(str(r.at), r.type, r.count) for r in counts.itertuples()] == [
        ("2026-11-01 10:00:00+00:00", "a", 2),
        ("2026-11-01 11:00:00+00:00", "b", 1),
    ]
    rows = headroom(
        {
            "anthropic-ratelimit-requests-limit": "50",
            "anthropic-ratelimit-requests-remaining": "49",
            "anthropic-ratelimit-requests-reset": "2026-11-01T10:00:00Z",
            "anthropic-ratelimit-tokens-limit": "oops",
        }
    )
    assert rows == [
        {"what": "requests", "limit": 50, "remaining": 49, "reset": "2026-11-01T10:00:00Z"}
    ]
