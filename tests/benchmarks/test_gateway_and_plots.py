"""The gateway comparison's arithmetic and report, and the PNG charts, on synthetic results.

No server, simulator or LiteLLM runs here: the inputs have the shapes the scenarios produce.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import yaml

from benchmarks import gateway, plots, report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _level(n: int, direct: list[float], litellm: list[float], ours: list[float]) -> dict[str, Any]:
    paths = gateway.summarize({"direct": direct, "litellm": litellm, "ours": ours})
    for entry in paths.values():
        entry.update(errors=0, error_kinds={})
    return {"concurrency": n, "rounds": 2, "paths": paths, "other_cpu_cores": 0.1}


def _gateway_result(litellm_ok: bool = True) -> dict[str, Any]:
    base = [450.0, 452.0, 455.0, 460.0]
    levels = [
        _level(1, base, [b + 3 for b in base], [b + 1 for b in base]),
        _level(16, base, [b + 4 for b in base], [b + 12 for b in base]),
        _level(64, base, [b + 30 for b in base], [b + 40 for b in base]),
    ]
    litellm: dict[str, Any] = {
        "version": gateway.LITELLM_VERSION,
        "endpoint": "/v1/messages",
        "workers": 1,
        "status": "ok",
        "config": gateway.litellm_config("http://127.0.0.1:9"),
        "same_events_as_direct": True,
        "same_input_tokens_as_direct": True,
    }
    if not litellm_ok:
        litellm.update(status="not installed", reason="pip: No matching distribution found")
        for level in levels:
            del level["paths"]["litellm"]
    return {
        "concurrency": [1, 16, 64],
        "rounds": {"1": 2, "16": 2, "64": 2},
        "simulator": {"ttft_ms": 200, "tokens_per_s": 100},
        "client": "anthropic 0.0 (AsyncAnthropic, messages.stream)",
        "litellm": litellm,
        "levels": levels,
        "resources": {"ours": {"rss_mb": 180.0, "cpu_ms_per_request": 3.2}},
        "errors": 0,
        "ok": True,
    }


def _results(gateway_result: dict[str, Any] | None = None) -> dict[str, Any]:
    scale = {
        "steps": [
            {
                "sessions": n,
                "lag_ms": {"p50": 20.0 + n / 10, "p99": 60.0 + n / 5},
                "rss_peak_mb": rss,
            }
            for n, rss in ((50, 190.0), (100, 210.0), (200, 260.0))
        ],
        "max_sessions": 200,
        "stopped_early": None,
        "targets": {"sessions": 500, "lag_p99_ms": 250.0, "rss_mb": 400.0},
        "ok": True,
    }

    def appends(rate: float) -> dict[str, Any]:
        return {"appends_per_s": rate, "latency_ms": {"p50": 5.0, "p99": 20.0}, "verify": {}}

    def longpoll(p50: float) -> dict[str, Any]:
        return {"latency_ms": {"p50": p50, "p99": p50 * 3}, "ok": True}

    return {
        "date": "2026-01-01T00:00:00Z",
        "machine": {"nproc": 2, "cpu_model": "test cpu", "memory_gib": 24, "kernel": "6"},
        "versions": {"chatops_git": "abc1234"},
        "servers": {
            "ours": {
                "scenarios": {
                    "gateway": gateway_result or _gateway_result(),
                    "scale": scale,
                    "appends": appends(5400.0),
                    "appends_many": appends(5100.0),
                    "longpoll": longpoll(3.6),
                }
            },
            "reference": {
                "scenarios": {
                    "appends": appends(3000.0),
                    "appends_many": appends(2900.0),
                    "longpoll": longpoll(2.0),
                }
            },
        },
    }


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_ttft_percentiles_overhead_and_ratio_to_direct() -> None:
    summary = gateway.summarize(
        {
            "direct": [100.0, 200.0, 300.0, 400.0],
            "litellm": [110.0, 210.0, 310.0, 410.0],
            "ours": [200.0, 400.0, 600.0, 800.0],
        }
    )
    # Nearest rank over four samples: p50 is the 2nd, p90 and p99 the 4th.
    assert summary["direct"]["ttft_ms"]["p50"] == 200.0
    assert summary["direct"]["ttft_ms"]["p99"] == 400.0
    assert "ratio_to_direct" not in summary["direct"]
    assert summary["litellm"]["overhead_ms"] == {"p50": 10.0, "p90": 10.0, "p99": 10.0}
    assert summary["litellm"]["ratio_to_direct"] == {"p50": 1.05, "p90": 1.025, "p99": 1.025}
    assert summary["ours"]["overhead_ms"] == {"p50": 200.0, "p90": 400.0, "p99": 400.0}
    assert summary["ours"]["ratio_to_direct"] == {"p50": 2.0, "p90": 2.0, "p99": 2.0}
    assert summary["ours"]["samples"] == 4


def test_ratio_needs_a_direct_measurement() -> None:
    summary = gateway.summarize({"direct": [], "ours": [5.0, 6.0]})
    assert summary["ours"]["ttft_ms"]["p50"] == 5.0
    assert summary["ours"]["overhead_ms"] == {}
    assert summary["ours"]["ratio_to_direct"] == {}


def test_compare_with_peer_uses_a_tolerance_of_one_percent_of_direct() -> None:
    assert report.gateway_compare(455.0, 450.0, direct=450.0) == "behind"  # 5 > 4.5
    assert report.gateway_compare(454.0, 450.0, direct=450.0) == "on par"
    assert report.gateway_compare(445.0, 450.0, direct=450.0) == "ahead"
    # Never tighter than 2 ms, however fast the direct call.
    assert report.gateway_compare(101.5, 100.0, direct=100.0) == "on par"
    assert report.gateway_compare(102.5, 100.0, direct=100.0) == "behind"


def test_litellm_config_points_the_anthropic_model_at_the_simulator() -> None:
    config = yaml.safe_load(gateway.litellm_config("http://127.0.0.1:4321"))
    (entry,) = config["model_list"]
    assert entry["model_name"] == "claude-sonnet-5-5"
    assert entry["litellm_params"]["model"] == "anthropic/claude-sonnet-5-5"
    assert entry["litellm_params"]["api_base"] == "http://127.0.0.1:4321"
    # LiteLLM refuses to start without one; the SDK sends this key on every path.
    assert config["general_settings"]["master_key"] == entry["litellm_params"]["api_key"]


def test_report_says_where_we_are_behind_litellm() -> None:
    res = _results()["servers"]["ours"]["scenarios"]["gateway"]
    standing = "\n".join(report.gateway_standing(res))
    # Ours +12 vs LiteLLM +4 at 16 (p50 and p99), +40 vs +30 at 64: behind; at 1, on par.
    assert "We are behind LiteLLM's proxy on" in standing
    assert "TTFT p50 at 16 concurrent: ours 464.0 ms vs 456.0 ms" in standing
    assert "at 64 concurrent" in standing
    assert "at 1 concurrent" not in standing
    section = "\n".join(report.gateway_markdown(_results()))
    x = report.TIMES
    assert (
        f"| 16 | p50 | 452.0 ms | 456.0 ms | 1.009{x} | 464.0 ms | 1.027{x} | **behind** |"
        in section
    )
    assert "| 1 | p50 | 452.0 ms | 455.0 ms |" in section
    assert f"litellm[proxy]=={gateway.LITELLM_VERSION}" in section
    assert "api_base: http://127.0.0.1:9" in section
    assert "while each level ran: 1 concurrent: 0.1 cores, 16 concurrent: 0.1 cores" in section
    assert "noisy" not in section
    results = _results()
    results["servers"]["ours"]["scenarios"]["gateway"]["levels"][2]["other_cpu_cores"] = 1.2
    assert "64 concurrent: 1.2 cores — these figures are noisy.**" in "\n".join(
        report.gateway_markdown(results)
    )


def test_report_records_why_litellm_was_not_measured() -> None:
    results = _results(_gateway_result(litellm_ok=False))
    section = "\n".join(report.gateway_markdown(results))
    assert "was not measured: not installed.** pip: No matching distribution found" in section
    assert f"| 16 | p50 | 452.0 ms | — | — | 464.0 ms | 1.027{report.TIMES} | — |" in section
    standing = report.gateway_standing(results["servers"]["ours"]["scenarios"]["gateway"])
    assert standing == [
        "- **Not compared with LiteLLM's proxy in this run:** not installed (see the gateway "
        "section)."
    ]
    check = report.gateway_check_text(results["servers"]["ours"]["scenarios"]["gateway"])
    assert "**LiteLLM not measured: not installed**" in check


def test_plots_render_every_chart_as_png(tmp_path: Path) -> None:
    written = plots.render(_results(), tmp_path)
    assert written == [plots.GATEWAY_PNG, plots.SCALE_PNG, plots.STREAMS_PNG]
    for name in written:
        path = tmp_path / name
        assert path.stat().st_size > 1000
        assert _png_size(path) == (10 * plots.DPI, int(4.2 * plots.DPI))


def test_plots_draw_only_what_the_results_hold(tmp_path: Path) -> None:
    results = _results(_gateway_result(litellm_ok=False))
    results["servers"] = {
        "ours": {"scenarios": {"gateway": results["servers"]["ours"]["scenarios"]["gateway"]}}
    }
    assert plots.render(results, tmp_path) == [plots.GATEWAY_PNG]
    assert sorted(p.name for p in tmp_path.iterdir()) == [plots.GATEWAY_PNG]
    assert _png_size(tmp_path / plots.GATEWAY_PNG)[0] > 0


def test_doc_links_the_charts_of_the_run() -> None:
    results = _results()
    results["plots"] = [plots.GATEWAY_PNG, plots.SCALE_PNG]
    lines = report.plots_markdown(results)
    assert "![Gateway TTFT: direct vs LiteLLM vs ours](bench/gateway_ttft.png)" in lines
    assert "![Scale steps: delivery lag and RSS](bench/scale.png)" in lines
    assert not any("streams.png" in line for line in lines)
    assert report.plots_markdown(_results()) == []


def test_gateway_runs_for_ours_only_with_a_progress_line() -> None:
    from benchmarks.__main__ import OURS_ONLY, OURS_ONLY_RUNNERS, _summary_line

    assert "gateway" in OURS_ONLY
    assert OURS_ONLY_RUNNERS["gateway"] is gateway.gateway
    line = _summary_line("gateway", _gateway_result(litellm_ok=False))
    assert line.startswith("c=1: direct p50 452.0 / p99 460.0 ms; ours p50 453.0")
    assert line.endswith("| LiteLLM: not installed")


def _with_steady(results: dict[str, Any], sustained: int, p99: float) -> dict[str, Any]:
    scale = results["servers"]["ours"]["scenarios"]["scale"]
    for step in scale["steps"]:
        step.update(finished=step["sessions"], errors=0)
    scale["errors"] = 0
    scale["rss_peak_mb"] = 260.0
    scale["lag_ms"] = scale["steps"][-1]["lag_ms"]
    scale["steady"] = {
        "steps": [
            {"sessions": n, "errors": 0, "window_s": 6.0, "lag_ms": {"p50": 60.0, "p99": lag}}
            for n, lag in ((50, 120.0), (100, p99), (150, 310.0))
        ],
        "max_sessions": sustained,
        "lag_ms": {"p50": 60.0, "p99": p99},
        "errors": 0,
        "stopped_early": "lag p99 310.0 ms > 250 ms at 150",
    }
    return results


def test_scale_targets_are_judged_on_the_steady_run() -> None:
    from benchmarks.__main__ import _summary_line

    results = _with_steady(_results(), sustained=100, p99=180.0)
    scale = results["servers"]["ours"]["scenarios"]["scale"]
    judged = {
        m.label: (m.get(scale), report._meets_target(m, m.get(scale), None))
        for m in report.METRICS
        if m.scenario == "scale"
    }
    assert judged["concurrent generations sustained (steady)"] == (100, False)
    assert judged["token delivery lag p99 (steady, largest passing step)"] == (180.0, True)
    # The all-at-once run is reported, without a target of its own.
    assert judged["concurrent generations reached, all started at once"] == (200, None)
    line = _summary_line("scale", scale)
    assert line.startswith("steady: 100 sessions sustained, lag p50 60.0 / p99 180.0 ms (stopped:")
    assert "burst start: 200 sessions" in line
    check = report._check_text("scale", scale)
    assert "steady — 50: 0 errors over 6.0 s, 100: 0 errors over 6.0 s" in check
    assert "stopped: lag p99 310.0 ms > 250 ms at 150" in check
