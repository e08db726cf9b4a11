"""Prices as data and the one cost function, checked against hand-computed amounts.

Every expected amount below was worked out by hand from the price table in
reference/anthropic-api.md §3.2 (USD per million tokens), not derived from prices.toml, so a
typo in the data file fails here.
"""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace

import pytest
from anthropic.types import CacheCreation, MessageDeltaUsage
from anthropic.types import Usage as SDKUsage
from hypothesis import given, settings
from hypothesis import strategies as st

from streams_service.llm.models import (
    Catalog,
    CatalogError,
    ModelInfo,
    Usage,
    cost_usd,
    estimate_cost_usd,
    load_catalog,
    round_usd,
)

ALLOWLIST = (
    "claude-sonnet-5-5",
    "claude-opus-5-5",
    "claude-haiku-5-5",
    "claude-sonnet-4-6",
    "claude-haiku-4-5",
)


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return load_catalog()


def model(model_id: str) -> ModelInfo:
    info = load_catalog().get(model_id)
    assert info is not None, model_id
    return info


# --- catalog -----------------------------------------------------------------------------------


def test_catalog_lists_the_allowlist_in_order(catalog: Catalog) -> None:
    assert catalog.ids() == ALLOWLIST
    assert tuple(m.id for m in catalog.models) == ALLOWLIST


def test_default_and_title_models(catalog: Catalog) -> None:
    assert catalog.default_model.id == "claude-sonnet-5-5"
    assert catalog.title_model.id == "claude-haiku-5-5"
    assert catalog.title_model.cheap
    assert not catalog.default_model.cheap


def test_unknown_model_is_not_allowlisted(catalog: Catalog) -> None:
    assert catalog.get("claude-opus-4-1") is None
    assert catalog.get("") is None
    # Dated ids are separate models to the API; the allowlist is exact.
    assert catalog.get("claude-haiku-4-5-20251001") is None


def test_provenance(catalog: Catalog) -> None:
    assert catalog.version
    assert catalog.as_of.isoformat() == "2026-11-25"
    assert any("platform.claude.com" in s for s in catalog.source)
    assert any("LiteLLM" in s for s in catalog.source)
    sonnet = model("claude-sonnet-5-5")
    assert sonnet.source is not None and "2026-10-07" in sonnet.source


def test_default_catalog_is_cached_and_matches_the_file(catalog: Catalog) -> None:
    assert load_catalog() is load_catalog()
    path = Path(__file__).parents[2] / "streams_service" / "llm" / "prices.toml"
    assert load_catalog(path) == catalog


@pytest.mark.parametrize("model_id", ALLOWLIST)
def test_every_model_has_all_five_prices(model_id: str) -> None:
    info = model(model_id)
    assert info.bands
    assert info.bands[-1].max_total_input_tokens is None
    for band in info.bands:
        for price in (
            band.input,
            band.cache_write_5m,
            band.cache_write_1h,
            band.cache_read,
            band.output,
        ):
            assert isinstance(price, Decimal)
            assert price.is_finite() and price > 0


@pytest.mark.parametrize(
    ("model_id", "prices"),
    [
        # input, 5m write, 1h write, cache read, output
        ("claude-sonnet-5-5", ("2", "2.5", "4", "0.10", "10")),
        ("claude-opus-5-5", ("4", "5", "8", "0.20", "20")),
        ("claude-haiku-5-5", ("0.10", "0.125", "0.20", "0.01", "0.50")),
        ("claude-sonnet-4-6", ("3", "3.75", "6", "0.30", "15")),
        ("claude-haiku-4-5", ("1", "1.25", "2", "0.10", "5")),
    ],
)
def test_first_band_prices_match_the_reference_table(
    model_id: str, prices: tuple[str, ...]
) -> None:
    band = model(model_id).bands[0]
    assert (
        band.input,
        band.cache_write_5m,
        band.cache_write_1h,
        band.cache_read,
        band.output,
    ) == tuple(Decimal(p) for p in prices)


def test_sonnet_5_5_cache_read_is_the_cut_price() -> None:
    assert model("claude-sonnet-5-5").bands[0].cache_read == Decimal("0.10")


@pytest.mark.parametrize(
    ("model_id", "thinking", "context_window", "max_output_tokens"),
    [
        ("claude-sonnet-5-5", "adaptive", 1_000_000, 128_000),
        ("claude-opus-5-5", "adaptive", 1_000_000, 128_000),
        ("claude-haiku-5-5", "adaptive", 1_000_000, 128_000),
        ("claude-sonnet-4-6", "enabled", 1_000_000, 128_000),
        ("claude-haiku-4-5", "enabled", 200_000, 64_000),
    ],
)
def test_capabilities(
    model_id: str, thinking: str, context_window: int, max_output_tokens: int
) -> None:
    caps = model(model_id).capabilities
    assert caps.thinking == thinking
    assert caps.context_window == context_window
    assert caps.max_output_tokens == max_output_tokens


def test_public_list_shape(catalog: Catalog) -> None:
    listing = catalog.public_list()
    json.dumps(listing)  # JSON-able as is
    assert [entry["id"] for entry in listing] == list(ALLOWLIST)
    assert [entry["id"] for entry in listing if entry["default"]] == ["claude-sonnet-5-5"]
    assert [entry["id"] for entry in listing if entry["title_model"]] == ["claude-haiku-5-5"]
    for entry in listing:
        assert set(entry) == {
            "id",
            "display_name",
            "default",
            "title_model",
            "cheap",
            "capabilities",
            "prices",
        }
        assert entry["display_name"].startswith("Claude ")
        assert set(entry["capabilities"]) == {"thinking", "max_output_tokens", "context_window"}
        prices = entry["prices"]
        assert prices["unit"] == "USD per million tokens"
        assert prices["version"] == catalog.version
        assert prices["as_of"] == "2026-11-25"
        assert prices["source"] == list(catalog.source)
        assert prices["bands"]
        for band in prices["bands"]:
            for name in ("input", "cache_write_5m", "cache_write_1h", "cache_read", "output"):
                assert isinstance(band[name], str)
                Decimal(band[name])  # parses
    haiku = next(e for e in listing if e["id"] == "claude-haiku-5-5")
    assert [b["max_total_input_tokens"] for b in haiku["prices"]["bands"]] == [100_000, None]
    assert haiku["prices"]["bands"][0]["cache_write_5m"] == "0.125"


# --- cost: each price column on its own, several models ------------------------------------------

N = 12_345


@pytest.mark.parametrize(
    ("model_id", "usage", "expected"),
    [
        # Sonnet 5.5: 2 / 2.50 / 4 / 0.10 / 10
        ("claude-sonnet-5-5", Usage(input_tokens=N), "0.02469"),
        ("claude-sonnet-5-5", Usage(cache_write_5m_tokens=N), "0.0308625"),
        ("claude-sonnet-5-5", Usage(cache_write_1h_tokens=N), "0.04938"),
        ("claude-sonnet-5-5", Usage(cache_read_tokens=N), "0.0012345"),
        ("claude-sonnet-5-5", Usage(output_tokens=N), "0.12345"),
        # Opus 5.5: 4 / 5 / 8 / 0.20 / 20
        ("claude-opus-5-5", Usage(input_tokens=N), "0.04938"),
        ("claude-opus-5-5", Usage(cache_write_5m_tokens=N), "0.061725"),
        ("claude-opus-5-5", Usage(cache_write_1h_tokens=N), "0.09876"),
        ("claude-opus-5-5", Usage(cache_read_tokens=N), "0.002469"),
        ("claude-opus-5-5", Usage(output_tokens=N), "0.2469"),
        # Haiku 5.5, prompt <= 100K: 0.10 / 0.125 / 0.20 / 0.01 / 0.50
        ("claude-haiku-5-5", Usage(input_tokens=N), "0.0012345"),
        ("claude-haiku-5-5", Usage(cache_write_5m_tokens=N), "0.001543125"),
        ("claude-haiku-5-5", Usage(cache_write_1h_tokens=N), "0.002469"),
        ("claude-haiku-5-5", Usage(cache_read_tokens=N), "0.00012345"),
        ("claude-haiku-5-5", Usage(output_tokens=N), "0.0061725"),
        # Sonnet 4.6: 3 / 3.75 / 6 / 0.30 / 15
        ("claude-sonnet-4-6", Usage(input_tokens=N), "0.037035"),
        ("claude-sonnet-4-6", Usage(cache_write_5m_tokens=N), "0.04629375"),
        ("claude-sonnet-4-6", Usage(cache_write_1h_tokens=N), "0.07407"),
        ("claude-sonnet-4-6", Usage(cache_read_tokens=N), "0.0037035"),
        ("claude-sonnet-4-6", Usage(output_tokens=N), "0.185175"),
        # Haiku 4.5: 1 / 1.25 / 2 / 0.10 / 5
        ("claude-haiku-4-5", Usage(input_tokens=N), "0.012345"),
        ("claude-haiku-4-5", Usage(cache_write_5m_tokens=N), "0.01543125"),
        ("claude-haiku-4-5", Usage(cache_write_1h_tokens=N), "0.02469"),
        ("claude-haiku-4-5", Usage(cache_read_tokens=N), "0.0012345"),
        ("claude-haiku-4-5", Usage(output_tokens=N), "0.061725"),
    ],
)
def test_each_price_column(model_id: str, usage: Usage, expected: str) -> None:
    assert cost_usd(model(model_id), usage) == Decimal(expected)


def test_all_columns_together_sonnet_5_5() -> None:
    usage = Usage(
        input_tokens=1_234,  # x 2    = 2468
        cache_write_5m_tokens=5_678,  # x 2.5  = 14195
        cache_write_1h_tokens=910,  # x 4    = 3640
        cache_read_tokens=111_111,  # x 0.10 = 11111.1
        output_tokens=4_321,  # x 10   = 43210
    )
    assert cost_usd(model("claude-sonnet-5-5"), usage) == Decimal("0.0746241")


def test_one_million_of_everything_opus_5_5() -> None:
    million = 1_000_000
    usage = Usage(million, million, million, million, million)
    # 4 + 20 + 0.20 + 5 + 8 (input, output, read, 5m, 1h)
    assert cost_usd(model("claude-opus-5-5"), usage) == Decimal("37.20")


def test_zero_usage_costs_nothing(catalog: Catalog) -> None:
    for info in catalog.models:
        assert cost_usd(info, Usage()) == 0


def test_cost_is_exact_not_rounded() -> None:
    # 1 cache-read token of Haiku 5.5 = 0.01 / 1e6 dollars, well below storage precision.
    assert cost_usd(model("claude-haiku-5-5"), Usage(cache_read_tokens=1)) == Decimal("1E-8")


# --- Haiku 5.5 bands ------------------------------------------------------------------------------


def test_haiku_5_5_band_boundary_is_inclusive() -> None:
    haiku = model("claude-haiku-5-5")
    assert haiku.price_for(0).input == Decimal("0.10")
    assert haiku.price_for(100_000).input == Decimal("0.10")
    assert haiku.price_for(100_001).input == Decimal("0.50")
    assert haiku.price_for(900_000).output == Decimal("2.50")
    with pytest.raises(ValueError):
        haiku.price_for(-1)


def test_haiku_5_5_at_exactly_100k_total_input_uses_the_low_band() -> None:
    usage = Usage(
        input_tokens=50_000,  # x 0.10  = 5000
        cache_write_5m_tokens=10_000,  # x 0.125 = 1250
        cache_write_1h_tokens=10_000,  # x 0.20  = 2000
        cache_read_tokens=30_000,  # x 0.01  = 300
        output_tokens=2_000,  # x 0.50  = 1000
    )
    assert usage.total_input_tokens == 100_000
    assert cost_usd(model("claude-haiku-5-5"), usage) == Decimal("0.00955")


def test_haiku_5_5_one_token_over_moves_every_category_to_the_high_band() -> None:
    usage = Usage(
        input_tokens=50_001,  # x 0.50  = 25000.5
        cache_write_5m_tokens=10_000,  # x 0.625 = 6250
        cache_write_1h_tokens=10_000,  # x 1.00  = 10000
        cache_read_tokens=30_000,  # x 0.05  = 1500
        output_tokens=2_000,  # x 2.50  = 5000
    )
    assert usage.total_input_tokens == 100_001
    assert cost_usd(model("claude-haiku-5-5"), usage) == Decimal("0.0477505")


def test_haiku_5_5_band_counts_cached_tokens_too() -> None:
    # input_tokens alone is tiny; cache reads push the request over 100K.
    usage = Usage(input_tokens=1, cache_read_tokens=100_000, output_tokens=0)
    # 1 x 0.50 + 100000 x 0.05 = 5000.5
    assert cost_usd(model("claude-haiku-5-5"), usage) == Decimal("0.0050005")


def test_single_band_models_ignore_prompt_size() -> None:
    small = cost_usd(model("claude-haiku-4-5"), Usage(input_tokens=1_000))
    large = cost_usd(model("claude-haiku-4-5"), Usage(input_tokens=1_000_000))
    assert large == small * 1_000


# --- rounding -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("amount", "expected"),
    [
        ("0.0746241", "0.074624"),
        ("0.0000005", "0.000000"),  # half to even
        ("0.0000015", "0.000002"),
        ("0.00000150001", "0.000002"),
        ("37.2", "37.200000"),
        ("1E-8", "0.000000"),
    ],
)
def test_round_usd(amount: str, expected: str) -> None:
    rounded = round_usd(Decimal(amount))
    assert rounded == Decimal(expected)
    assert rounded.as_tuple().exponent == -6


# --- Usage.from_anthropic ------------------------------------------------------------------------


def test_from_sdk_usage_with_ttl_breakdown() -> None:
    sdk = SDKUsage(
        input_tokens=10,
        output_tokens=20,
        cache_read_input_tokens=30,
        cache_creation_input_tokens=300,
        cache_creation=CacheCreation(ephemeral_5m_input_tokens=100, ephemeral_1h_input_tokens=200),
    )
    assert Usage.from_anthropic(sdk) == Usage(
        input_tokens=10,
        output_tokens=20,
        cache_read_tokens=30,
        cache_write_5m_tokens=100,
        cache_write_1h_tokens=200,
    )


def test_from_sdk_usage_without_breakdown_counts_writes_as_5m() -> None:
    sdk = SDKUsage(
        input_tokens=10,
        output_tokens=20,
        cache_read_input_tokens=None,
        cache_creation_input_tokens=300,
        cache_creation=None,
    )
    assert Usage.from_anthropic(sdk) == Usage(10, 20, 0, 300, 0)


def test_from_sdk_message_delta_usage() -> None:
    delta = MessageDeltaUsage(
        output_tokens=42,
        input_tokens=None,
        cache_creation_input_tokens=None,
        cache_read_input_tokens=7,
        server_tool_use=None,
    )
    assert Usage.from_anthropic(delta) == Usage(output_tokens=42, cache_read_tokens=7)


def test_from_plain_object() -> None:
    obj = SimpleNamespace(
        input_tokens=1,
        output_tokens=2,
        cache_read_input_tokens=3,
        cache_creation_input_tokens=9,
        cache_creation=SimpleNamespace(ephemeral_5m_input_tokens=4, ephemeral_1h_input_tokens=5),
    )
    assert Usage.from_anthropic(obj) == Usage(1, 2, 3, 4, 5)


def test_from_dict_with_breakdown() -> None:
    raw = {
        "input_tokens": 1,
        "output_tokens": 2,
        "cache_read_input_tokens": 3,
        "cache_creation_input_tokens": 9,
        "cache_creation": {"ephemeral_5m_input_tokens": 4, "ephemeral_1h_input_tokens": 5},
        "service_tier": "standard",
    }
    assert Usage.from_anthropic(raw) == Usage(1, 2, 3, 4, 5)


def test_from_dict_without_breakdown() -> None:
    raw = {"input_tokens": 1, "output_tokens": 2, "cache_creation_input_tokens": 9}
    assert Usage.from_anthropic(raw) == Usage(1, 2, 0, 9, 0)


def test_from_dict_with_nulls_and_missing_fields() -> None:
    raw = {"output_tokens": 5, "input_tokens": None, "cache_creation": None}
    assert Usage.from_anthropic(raw) == Usage(output_tokens=5)
    assert Usage.from_anthropic({}) == Usage()


def test_partial_breakdown_bills_the_rest_as_5m() -> None:
    raw = {
        "cache_creation_input_tokens": 100,
        "cache_creation": {"ephemeral_1h_input_tokens": 60},
    }
    assert Usage.from_anthropic(raw) == Usage(cache_write_5m_tokens=40, cache_write_1h_tokens=60)


@pytest.mark.parametrize(
    "raw",
    [
        {"input_tokens": -1},
        {"input_tokens": "12"},
        {"output_tokens": 1.5},
        {"output_tokens": True},
        {"cache_creation": {"ephemeral_5m_input_tokens": -3}},
    ],
)
def test_from_anthropic_rejects_nonsense(raw: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Usage.from_anthropic(raw)


def test_usage_rejects_negative_counts() -> None:
    with pytest.raises(ValueError):
        Usage(input_tokens=-1)


def test_from_anthropic_then_cost() -> None:
    sdk = SDKUsage(
        input_tokens=1_000,
        output_tokens=500,
        cache_read_input_tokens=2_000,
        cache_creation_input_tokens=4_000,
        cache_creation=CacheCreation(
            ephemeral_5m_input_tokens=3_000, ephemeral_1h_input_tokens=1_000
        ),
    )
    # Haiku 4.5: 1000x1 + 500x5 + 2000x0.1 + 3000x1.25 + 1000x2 = 1000+2500+200+3750+2000 = 9450
    assert cost_usd(model("claude-haiku-4-5"), Usage.from_anthropic(sdk)) == Decimal("0.00945")


# --- estimate (budget reservation) --------------------------------------------------------------


def test_estimate_hand_computed() -> None:
    # Sonnet 5.5: 10,000 input x 2 + 4,096 output x 10 = 20000 + 40960 = 60960
    assert estimate_cost_usd(model("claude-sonnet-5-5"), 10_000, 4_096) == Decimal("0.06096")
    # Haiku 5.5 just over the band: 100,001 x 0.50 + 1,000 x 2.50 = 50000.5 + 2500
    assert estimate_cost_usd(model("claude-haiku-5-5"), 100_001, 1_000) == Decimal("0.0525005")
    # ... and at the band edge: 100,000 x 0.10 + 1,000 x 0.50 = 10000 + 500
    assert estimate_cost_usd(model("claude-haiku-5-5"), 100_000, 1_000) == Decimal("0.0105")
    # With a 1h cache write declared the input is priced at the write rate: 10,000 x 4 + 0
    assert estimate_cost_usd(model("claude-sonnet-5-5"), 10_000, 0, cache_write_ttl="1h") == (
        Decimal("0.04")
    )


def test_estimate_without_ttl_does_not_cover_cache_writes() -> None:
    # Why `cache_write_ttl` exists: base-price reservation undercounts a request that writes
    # its prompt to the 1-hour cache (2x input).
    sonnet = model("claude-sonnet-5-5")
    usage = Usage(cache_write_1h_tokens=10_000)
    assert cost_usd(sonnet, usage) > estimate_cost_usd(sonnet, 10_000, 0)
    assert cost_usd(sonnet, usage) <= estimate_cost_usd(sonnet, 10_000, 0, cache_write_ttl="1h")


def test_estimate_rejects_negative() -> None:
    with pytest.raises(ValueError):
        estimate_cost_usd(model("claude-opus-5-5"), -1, 10)


@st.composite
def bounded_usage(draw: st.DrawFn, ttl: str | None) -> tuple[str, int, int, Usage]:
    model_id = draw(st.sampled_from(ALLOWLIST))
    estimate = draw(st.integers(min_value=0, max_value=2_000_000))
    max_output = draw(st.integers(min_value=0, max_value=128_000))
    remaining = draw(st.integers(min_value=0, max_value=estimate))
    parts: list[int] = []
    categories = {None: 2, "5m": 3, "1h": 4}[ttl]
    for _ in range(categories - 1):
        part = draw(st.integers(min_value=0, max_value=remaining))
        parts.append(part)
        remaining -= part
    parts.append(remaining)
    parts += [0] * (4 - len(parts))
    input_tokens, read, write_5m, write_1h = parts
    usage = Usage(
        input_tokens=input_tokens,
        output_tokens=draw(st.integers(min_value=0, max_value=max_output)),
        cache_read_tokens=read,
        cache_write_5m_tokens=write_5m,
        cache_write_1h_tokens=write_1h,
    )
    return model_id, estimate, max_output, usage


@settings(max_examples=300)
@given(bounded_usage(None))
def test_estimate_bounds_any_usage_without_cache_writes(
    case: tuple[str, int, int, Usage],
) -> None:
    model_id, estimate, max_output, usage = case
    info = model(model_id)
    assert usage.total_input_tokens <= estimate and usage.output_tokens <= max_output
    assert estimate_cost_usd(info, estimate, max_output) >= cost_usd(info, usage)


@settings(max_examples=300)
@given(bounded_usage("5m"))
def test_estimate_with_5m_ttl_bounds_5m_writes(case: tuple[str, int, int, Usage]) -> None:
    model_id, estimate, max_output, usage = case
    info = model(model_id)
    assert estimate_cost_usd(info, estimate, max_output, cache_write_ttl="5m") >= cost_usd(
        info, usage
    )


@settings(max_examples=300)
@given(bounded_usage("1h"))
def test_estimate_with_1h_ttl_bounds_every_mix(case: tuple[str, int, int, Usage]) -> None:
    model_id, estimate, max_output, usage = case
    info = model(model_id)
    assert estimate_cost_usd(info, estimate, max_output, cache_write_ttl="1h") >= cost_usd(
        info, usage
    )


# --- the loader refuses bad files ---------------------------------------------------------------

GOOD = """
version = "t1"
as_of = 2026-01-01
source = "test"
default_model = "m"
title_model = "m"

[[models]]
id = "m"
display_name = "M"
thinking = "none"
context_window = 1000
max_output_tokens = 100
cheap = true

[[models.prices]]
max_total_input_tokens = 10
input = 1
cache_write_5m = 1.25
cache_write_1h = 2
cache_read = 0.1
output = 5

[[models.prices]]
input = 2
cache_write_5m = 2.5
cache_write_1h = 4
cache_read = 0.2
output = 10
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "prices.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_custom_file_loads(tmp_path: Path) -> None:
    catalog = load_catalog(write(tmp_path, GOOD))
    assert catalog.source == ("test",)
    info = catalog.default_model
    assert info.capabilities.thinking == "none"
    assert cost_usd(info, Usage(input_tokens=10)) == Decimal("0.00001")
    assert cost_usd(info, Usage(input_tokens=11)) == Decimal("0.000022")


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("cache_read = 0.1\n", "", "missing price 'cache_read'"),
        ('thinking = "none"', 'thinking = "manual"', "thinking must be one of"),
        ('default_model = "m"', 'default_model = "x"', "default_model 'x' is not in models"),
        ("cheap = true", "cheap = false", "must be marked cheap"),
        ("max_total_input_tokens = 10\n", "", "only the last price band may be unbounded"),
        ("input = 2\n", "input = 0.5\n", "must not be cheaper"),
        ("cache_read = 0.1", "cache_read = 1.5", "cache_read <= input"),
        ("output = 5", 'output = "5"', "must be a number"),
        ("max_output_tokens = 100", "max_output_tokens = true", "max_output_tokens must be"),
        ('version = "t1"', "", "version must be a str"),
    ],
)
def test_bad_files_are_refused(tmp_path: Path, old: str, new: str, message: str) -> None:
    assert old in GOOD
    with pytest.raises(CatalogError, match=message):
        load_catalog(write(tmp_path, GOOD.replace(old, new, 1)))
