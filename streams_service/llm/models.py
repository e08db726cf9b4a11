"""The model allowlist, capabilities and prices (data in prices.toml) and the one cost function.

Money is `Decimal` end to end: prices are parsed from TOML straight into `Decimal`, costs are
computed exactly and only rounded (`round_usd`) when they are stored. Nothing is read at import
time; `load_catalog()` reads and validates the packaged file once, on first use.
"""

from __future__ import annotations

import datetime as dt
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Context, Decimal, localcontext
from functools import cache
from importlib import resources
from itertools import pairwise
from pathlib import Path
from typing import Any, Literal, TypeAlias, cast, get_args

ThinkingMode: TypeAlias = Literal["adaptive", "enabled", "none"]
CacheTTL: TypeAlias = Literal["5m", "1h"]

PRICE_FILE = "prices.toml"
PER_MTOK = Decimal(1_000_000)
# Six decimal places = a millionth of a dollar, far below one token of the cheapest model at
# scale and the precision the cost columns are stored with.
USD_QUANTUM = Decimal("0.000001")
# Enough digits that token counts times prices are always exact, whatever context the caller
# has installed (the default 28 digits would be enough too, but must not be relied on).
EXACT_CONTEXT = Context(prec=60, rounding=ROUND_HALF_EVEN)

_PRICE_FIELDS = ("input", "cache_write_5m", "cache_write_1h", "cache_read", "output")

# Builds the CatalogError for a message, prefixed with the file it came from.
_Fail: TypeAlias = Callable[[str], "CatalogError"]


class CatalogError(ValueError):
    """The price file is missing a field, has a wrong type, or breaks an invariant."""


@dataclass(frozen=True, slots=True)
class PriceBand:
    """USD per million tokens for requests whose total input is at most `max_total_input_tokens`.

    `max_total_input_tokens` is inclusive; None means no upper limit (the last band).
    """

    max_total_input_tokens: int | None
    input: Decimal
    cache_write_5m: Decimal
    cache_write_1h: Decimal
    cache_read: Decimal
    output: Decimal

    def covers(self, total_input_tokens: int) -> bool:
        return (
            self.max_total_input_tokens is None or total_input_tokens <= self.max_total_input_tokens
        )

    def public(self) -> dict[str, Any]:
        # Strings, not floats: JSON clients must not turn 0.125 into 0.12499999.
        return {
            "max_total_input_tokens": self.max_total_input_tokens,
            **{name: _decimal_str(getattr(self, name)) for name in _PRICE_FIELDS},
        }


@dataclass(frozen=True, slots=True)
class Capabilities:
    thinking: ThinkingMode
    max_output_tokens: int
    context_window: int

    def public(self) -> dict[str, Any]:
        return {
            "thinking": self.thinking,
            "max_output_tokens": self.max_output_tokens,
            "context_window": self.context_window,
        }


@dataclass(frozen=True, slots=True)
class ModelInfo:
    id: str
    display_name: str
    capabilities: Capabilities
    bands: tuple[PriceBand, ...]
    # Cheap enough for background work (titles); shown to users as a hint only.
    cheap: bool
    source: str | None = None

    def price_for(self, total_input_tokens: int) -> PriceBand:
        """The band for a request with this total input (input + cache writes + cache reads)."""
        if total_input_tokens < 0:
            raise ValueError(f"total_input_tokens must be >= 0, got {total_input_tokens}")
        for band in self.bands:
            if band.covers(total_input_tokens):
                return band
        # The loader guarantees an unbounded last band; this only guards hand-built ModelInfo.
        raise ValueError(f"{self.id}: no price band covers {total_input_tokens} input tokens")


@dataclass(frozen=True, slots=True)
class Usage:
    """Billable token counts of one upstream request.

    `input_tokens` excludes cached tokens, as in the API; `output_tokens` includes thinking.
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_5m_tokens: int = 0
    cache_write_1h_tokens: int = 0

    def __post_init__(self) -> None:
        for name in (
            "input_tokens",
            "output_tokens",
            "cache_read_tokens",
            "cache_write_5m_tokens",
            "cache_write_1h_tokens",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"Usage.{name} must be a non-negative int, got {value!r}")

    @property
    def cache_write_tokens(self) -> int:
        return self.cache_write_5m_tokens + self.cache_write_1h_tokens

    @property
    def total_input_tokens(self) -> int:
        """What the API calls the request's total input; it picks the price band."""
        return self.input_tokens + self.cache_write_tokens + self.cache_read_tokens

    @classmethod
    def from_anthropic(cls, usage: object) -> Usage:
        """Read the SDK's `Usage` / `MessageDeltaUsage` object, or the same thing as a dict.

        Missing or None fields count as 0 (the SDK leaves optional fields None). Cache writes are
        split by TTL from `cache_creation`; without that breakdown, all of
        `cache_creation_input_tokens` is 5-minute, the API's default TTL. If the breakdown adds
        up to less than the total, the rest is billed as 5-minute rather than dropped, so a
        partial breakdown can never make a request look cheaper than it was.
        """
        created_total = _count(usage, "cache_creation_input_tokens")
        breakdown = _field(usage, "cache_creation")
        if breakdown is None:
            write_5m, write_1h = created_total, 0
        else:
            write_5m = _count(breakdown, "ephemeral_5m_input_tokens")
            write_1h = _count(breakdown, "ephemeral_1h_input_tokens")
            write_5m += max(0, created_total - write_5m - write_1h)
        return cls(
            input_tokens=_count(usage, "input_tokens"),
            output_tokens=_count(usage, "output_tokens"),
            cache_read_tokens=_count(usage, "cache_read_input_tokens"),
            cache_write_5m_tokens=write_5m,
            cache_write_1h_tokens=write_1h,
        )


def _field(obj: object, name: str) -> object:
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


def _count(obj: object, name: str) -> int:
    value = _field(obj, name)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"usage field {name!r} must be a non-negative int, got {value!r}")
    return value


def cost_usd(model: ModelInfo, usage: Usage) -> Decimal:
    """What one request cost, exactly (not rounded): every category at its band's price."""
    band = model.price_for(usage.total_input_tokens)
    with localcontext(EXACT_CONTEXT):
        token_price_sum = (
            usage.input_tokens * band.input
            + usage.cache_write_5m_tokens * band.cache_write_5m
            + usage.cache_write_1h_tokens * band.cache_write_1h
            + usage.cache_read_tokens * band.cache_read
            + usage.output_tokens * band.output
        )
        return token_price_sum / PER_MTOK


def estimate_cost_usd(
    model: ModelInfo,
    input_tokens_estimate: int,
    max_output_tokens: int,
    *,
    cache_write_ttl: CacheTTL | None = None,
) -> Decimal:
    """The most a request can cost, reserved against budgets before it is sent.

    All input is priced at the base input price of the band the estimate falls in, plus the full
    `max_output_tokens` (thinking included) at that band's output price. That bounds any usage
    with total input <= the estimate and output <= max_output_tokens, *provided the request
    writes no cache*: a cache write costs more than base input (1.25x for 5m, 2x for 1h). A
    request that sets `cache_control` must pass its TTL as `cache_write_ttl`, and the input is
    then priced at that write rate instead, which bounds every mix of input, reads and writes of
    that TTL (the loader checks read <= input <= 5m write <= 1h write, and that bands only rise).
    """
    if input_tokens_estimate < 0 or max_output_tokens < 0:
        raise ValueError("token estimates must be >= 0")
    band = model.price_for(input_tokens_estimate)
    input_price = {
        None: band.input,
        "5m": band.cache_write_5m,
        "1h": band.cache_write_1h,
    }[cache_write_ttl]
    with localcontext(EXACT_CONTEXT):
        token_price_sum = input_tokens_estimate * input_price + max_output_tokens * band.output
        return token_price_sum / PER_MTOK


def round_usd(amount: Decimal) -> Decimal:
    """Round a cost to 6 decimal places (half-even, like the database's numeric rounding)."""
    with localcontext(EXACT_CONTEXT):
        return amount.quantize(USD_QUANTUM, rounding=ROUND_HALF_EVEN)


@dataclass(frozen=True, slots=True)
class Catalog:
    """The allowlist, in the file's order, plus the price file's provenance."""

    version: str
    as_of: dt.date
    source: tuple[str, ...]
    models: tuple[ModelInfo, ...]
    default_model: ModelInfo
    title_model: ModelInfo
    _by_id: Mapping[str, ModelInfo] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_id", {model.id: model for model in self.models})

    def get(self, model_id: str) -> ModelInfo | None:
        """The model if it is allowlisted, else None (callers turn that into a 400)."""
        return self._by_id.get(model_id)

    def ids(self) -> tuple[str, ...]:
        return tuple(model.id for model in self.models)

    def public_list(self) -> list[dict[str, Any]]:
        """The body of `GET /v1/models`: JSON-able, prices as strings in USD per MTok."""
        pricing = {
            "unit": "USD per million tokens",
            "version": self.version,
            "as_of": self.as_of.isoformat(),
            "source": list(self.source),
        }
        return [
            {
                "id": model.id,
                "display_name": model.display_name,
                "default": model.id == self.default_model.id,
                "title_model": model.id == self.title_model.id,
                "cheap": model.cheap,
                "capabilities": model.capabilities.public(),
                "prices": {
                    **pricing,
                    "model_source": model.source,
                    "bands": [band.public() for band in model.bands],
                },
            }
            for model in self.models
        ]


def load_catalog(path: Path | None = None) -> Catalog:
    """The catalog from `path`, or the packaged prices.toml (read once and cached)."""
    if path is None:
        return _packaged_catalog()
    with path.open("rb") as fh:
        return parse_catalog(tomllib.load(fh, parse_float=Decimal), origin=str(path))


@cache
def _packaged_catalog() -> Catalog:
    text = (
        resources.files(__package__ or "streams_service.llm")
        .joinpath(PRICE_FILE)
        .read_text(encoding="utf-8")
    )
    return parse_catalog(tomllib.loads(text, parse_float=Decimal), origin=PRICE_FILE)


def parse_catalog(data: Mapping[str, Any], *, origin: str = "<data>") -> Catalog:
    """Validate already-parsed TOML (floats as Decimal) into a Catalog; CatalogError if invalid."""

    def fail(message: str) -> CatalogError:
        return CatalogError(f"{origin}: {message}")

    version = _require(data, "version", str, fail)
    as_of = _require(data, "as_of", dt.date, fail)
    if isinstance(as_of, dt.datetime):
        raise fail("as_of must be a date, not a datetime")
    raw_source = data.get("source")
    if isinstance(raw_source, str):
        source: tuple[str, ...] = (raw_source,)
    elif (
        isinstance(raw_source, list) and raw_source and all(isinstance(s, str) for s in raw_source)
    ):
        source = tuple(raw_source)
    else:
        raise fail("source must be a string or a non-empty list of strings")

    raw_models = data.get("models")
    if not isinstance(raw_models, list) or not raw_models:
        raise fail("models must be a non-empty array of tables ([[models]])")
    models = tuple(_parse_model(raw, index, fail) for index, raw in enumerate(raw_models))
    by_id: dict[str, ModelInfo] = {}
    for model in models:
        if model.id in by_id:
            raise fail(f"model {model.id!r} is listed twice")
        by_id[model.id] = model

    default_id = _require(data, "default_model", str, fail)
    title_id = _require(data, "title_model", str, fail)
    if default_id not in by_id:
        raise fail(f"default_model {default_id!r} is not in models")
    if title_id not in by_id:
        raise fail(f"title_model {title_id!r} is not in models")
    if not by_id[title_id].cheap:
        raise fail(f"title_model {title_id!r} must be marked cheap")
    return Catalog(
        version=version,
        as_of=as_of,
        source=source,
        models=models,
        default_model=by_id[default_id],
        title_model=by_id[title_id],
    )


def _parse_model(raw: object, index: int, fail: _Fail) -> ModelInfo:
    if not isinstance(raw, Mapping):
        raise fail(f"models[{index}] must be a table")
    model_id = _require(raw, "id", str, fail, where=f"models[{index}]")
    where = f"model {model_id!r}"
    thinking = _require(raw, "thinking", str, fail, where=where)
    if thinking not in get_args(ThinkingMode):
        raise fail(f"{where}: thinking must be one of {get_args(ThinkingMode)}, got {thinking!r}")
    capabilities = Capabilities(
        thinking=cast(ThinkingMode, thinking),  # checked against ThinkingMode just above
        max_output_tokens=_positive_int(raw, "max_output_tokens", fail, where),
        context_window=_positive_int(raw, "context_window", fail, where),
    )
    raw_source = raw.get("source")
    if raw_source is not None and not isinstance(raw_source, str):
        raise fail(f"{where}: source must be a string")
    cheap = raw.get("cheap", False)
    if not isinstance(cheap, bool):
        raise fail(f"{where}: cheap must be a boolean")
    raw_bands = raw.get("prices")
    if not isinstance(raw_bands, list) or not raw_bands:
        raise fail(f"{where}: needs at least one [[models.prices]] band")
    bands = tuple(
        _parse_band(band, f"{where} prices[{i}]", fail) for i, band in enumerate(raw_bands)
    )
    _check_bands(bands, where, fail)
    return ModelInfo(
        id=model_id,
        display_name=_require(raw, "display_name", str, fail, where=where),
        capabilities=capabilities,
        bands=bands,
        cheap=cheap,
        source=raw_source,
    )


def _parse_band(raw: object, where: str, fail: _Fail) -> PriceBand:
    if not isinstance(raw, Mapping):
        raise fail(f"{where} must be a table")
    limit = raw.get("max_total_input_tokens")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise fail(f"{where}: max_total_input_tokens must be a positive integer")
    prices: dict[str, Decimal] = {}
    for name in _PRICE_FIELDS:
        value = raw.get(name)
        if value is None:
            raise fail(f"{where}: missing price {name!r}")
        # Integers are fine (`input = 2`); floats cannot occur (parse_float=Decimal), but a file
        # loaded without that hook must not sneak binary floats into money.
        if isinstance(value, bool) or not isinstance(value, int | Decimal):
            raise fail(f"{where}: price {name!r} must be a number, got {value!r}")
        price = Decimal(value)
        if not price.is_finite() or price < 0:
            raise fail(f"{where}: price {name!r} must be finite and >= 0")
        prices[name] = price
    return PriceBand(max_total_input_tokens=limit, **prices)


def _check_bands(bands: tuple[PriceBand, ...], where: str, fail: _Fail) -> None:
    limits = [band.max_total_input_tokens for band in bands]
    if limits[-1] is not None:
        raise fail(f"{where}: the last price band must have no max_total_input_tokens")
    bounded = [limit for limit in limits[:-1] if limit is not None]
    if len(bounded) != len(limits) - 1:
        raise fail(f"{where}: only the last price band may be unbounded")
    if any(lower >= upper for lower, upper in pairwise(bounded)):
        raise fail(f"{where}: max_total_input_tokens must increase from band to band")
    for band in bands:
        if not band.cache_read <= band.input <= band.cache_write_5m <= band.cache_write_1h:
            raise fail(f"{where}: expected cache_read <= input <= cache_write_5m <= cache_write_1h")
    for smaller, larger in pairwise(bands):
        if any(getattr(larger, name) < getattr(smaller, name) for name in _PRICE_FIELDS):
            raise fail(f"{where}: a larger-prompt band must not be cheaper than the one before")


def _require(
    data: Mapping[str, Any],
    key: str,
    kind: type[Any],
    fail: _Fail,
    *,
    where: str | None = None,
) -> Any:
    value = data.get(key)
    # bool is an int subclass: `max_output_tokens = true` must not pass as 1.
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        prefix = f"{where}: " if where else ""
        raise fail(f"{prefix}{key} must be a {kind.__name__}, got {value!r}")
    return value


def _positive_int(data: Mapping[str, Any], key: str, fail: _Fail, where: str) -> int:
    value: int = _require(data, key, int, fail, where=where)
    if value < 1:
        raise fail(f"{where}: {key} must be positive")
    return value


def _decimal_str(value: Decimal) -> str:
    # Fixed-point, never "1E+1": the file's own digits ("0.125", "2.00") are kept as written.
    return f"{value:f}"
