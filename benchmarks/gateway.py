"""Gateway overhead (ours only): time to first token through our service, LiteLLM's proxy, direct.

One standalone `chatops simulator` (200 ms to first event, 100 tokens/s) serves three paths:

- `direct`: the official Anthropic SDK (`AsyncAnthropic(base_url=simulator)`) streaming
  `/v1/messages`, sending what our service sends upstream for a first message (the session
  scenarios' `_direct_params`: system prompt, tool specs, adaptive thinking, max_tokens).
- `litellm`: the same SDK call, the same request, against LiteLLM's proxy (`litellm[proxy]`,
  pinned below), whose Anthropic-format `/v1/messages` endpoint forwards to the simulator
  through a `model_list` entry (provider `anthropic`, `api_base` = the simulator) and streams the
  upstream's named SSE events back.
- `ours`: our service (ANTHROPIC_BASE_URL = the simulator): create a session, open a live SSE
  reader at its stream's tail, POST the message; TTFT is the first TEXT_MESSAGE_CONTENT at the
  reader minus the POST's start (the session scenarios' reader and session code).

TTFT is the time to the first text delta, so every path includes the simulator's thinking
block before the text. Each concurrency level (1, 16, 64) runs several rounds; in each round
every path fires that many requests at once, paths one after another in a rotating order so
none always runs right after another (our service makes a title call after a session's first
exchange, which the pause after its round lets finish). The figures are p50/p99 per path and
the ratio (and difference) to direct.

LiteLLM lives in its own virtualenv (benchmarks/.litellm-venv, gitignored), created on first
use, so its large and conflicting dependency tree never enters the project's venv. If it cannot
be installed or started, the result says exactly why and the other two paths are still measured.

Everything talks only to 127.0.0.1 (LiteLLM is told to use its bundled model cost map rather than
fetch one), and every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from benchmarks import servers
from benchmarks.loadgen import percentiles
from benchmarks.scenarios import Config
from benchmarks.servers import Server
from benchmarks.sessions import (
    API_KEY,
    MODEL,
    _client,
    _direct_params,
    _direct_round,
    _guarded,
    _ours,
    _service_round,
    _Simulator,
    _simulator,
    _summarize_errors,
)

SCENARIOS = ("gateway",)
Result = dict[str, Any]

PATHS = ("direct", "litellm", "ours")
PATH_LABELS = {
    "direct": "direct (Anthropic SDK → simulator)",
    "litellm": "LiteLLM proxy /v1/messages",
    "ours": "our service (session → SSE)",
}
CONCURRENCY = (1, 16, 64)
# Rounds per level: more at low concurrency, where one round is one sample.
ROUNDS = {1: 12, 16: 4, 64: 3}
WARMUP_REQUESTS = 4
SIM_TTFT_MS = 200
SIM_TOKENS_PER_S = 100
PAUSE_S = 0.3  # between two paths' rounds
PAUSE_AFTER_OURS_S = 1.0  # our title calls after first exchanges hit the simulator too
PERCENTILES = ("p50", "p90", "p99")
MB = 1024 * 1024

# The newest release whose `[proxy]` extra resolves on the package index reachable here: newer
# ones (1.108.14, 1.109.x) pin litellm-proxy-extras builds it lacks, and 1.110.x moved the proxy
# into a separate `litellm-proxy` package it does not have.
LITELLM_VERSION = "1.108.6"
LITELLM_VENV = servers.REPO / "benchmarks" / ".litellm-venv"
LITELLM_INSTALL_TIMEOUT_S = 900
LITELLM_START_TIMEOUT_S = 180  # it imports a great deal; ~20 s on an idle 2-core machine


# --- LiteLLM --------------------------------------------------------------------------------


class LiteLLMUnavailable(RuntimeError):
    """LiteLLM could not be installed or started; the message says why."""


def _pip_error(proc: subprocess.CompletedProcess[str]) -> str:
    # pip prints one warning per package for the offline mirrors configured here; skip them.
    lines = [
        line
        for line in (proc.stderr or proc.stdout).splitlines()
        if line.strip() and not line.startswith("WARNING: Location")
    ]
    return "\n".join(lines[-8:]) or f"exit status {proc.returncode}"


def _installed_litellm(python: Path) -> str | None:
    if not python.exists():
        return None
    proc = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return proc.stdout.strip() if proc.returncode == 0 else None


def ensure_litellm(venv: Path = LITELLM_VENV, version: str = LITELLM_VERSION) -> Path:
    """The `litellm` executable of the pinned release, installing it into `venv` if needed."""
    python, exe = venv / "bin" / "python", venv / "bin" / "litellm"
    if _installed_litellm(python) == version and exe.exists():
        return exe
    if not python.exists():
        base = shutil.which("python3") or sys.executable
        proc = subprocess.run(
            [base, "-m", "venv", str(venv)], capture_output=True, text=True, timeout=300
        )
        if proc.returncode != 0:
            raise LiteLLMUnavailable(f"`python3 -m venv {venv}` failed: {_pip_error(proc)}")
    print(f"  gateway: installing litellm[proxy]=={version} into {venv} ...", flush=True)
    try:
        proc = subprocess.run(
            [
                *(str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q"),
                f"litellm[proxy]=={version}",
            ],
            capture_output=True,
            text=True,
            timeout=LITELLM_INSTALL_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as exc:
        raise LiteLLMUnavailable(f"pip install litellm[proxy]=={version} timed out") from exc
    if proc.returncode != 0:
        raise LiteLLMUnavailable(
            f"pip install litellm[proxy]=={version} failed:\n{_pip_error(proc)}"
        )
    if not exe.exists():
        raise LiteLLMUnavailable(f"litellm[proxy]=={version} installed but {exe} is missing")
    return exe


def litellm_config(sim_url: str) -> str:
    """LiteLLM's proxy config: one Anthropic model served by the simulator.

    The `anthropic/` provider makes `/v1/messages` forward the request in Anthropic's format (no
    translation through OpenAI's) and stream the upstream's SSE events back. The proxy refuses to
    start without a master key (1.108 checks at boot), so it gets the benchmark's dummy key,
    which the SDK sends on every path; with no database, checking it is a string comparison.
    """
    return (
        "model_list:\n"
        f"  - model_name: {MODEL}\n"
        "    litellm_params:\n"
        f"      model: anthropic/{MODEL}\n"
        f"      api_base: {sim_url}\n"
        f"      api_key: {API_KEY}\n"
        "litellm_settings:\n"
        "  telemetry: false\n"
        "general_settings:\n"
        f"  master_key: {API_KEY}\n"
    )


@dataclass
class _Proxy(_Simulator):
    """The LiteLLM proxy process: the simulator's handle, plus what we measure of it."""

    def rss_bytes(self) -> int:
        return sum(servers._vm_rss(pid) for pid in servers._process_tree(self.proc.pid))

    def cpu_seconds(self) -> float:
        return _tree_cpu_seconds(self.proc.pid)


def _cpu_of(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        fields = servers._stat_fields(pid)
        if fields:
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def _tree_cpu_seconds(root: int) -> float:
    return _cpu_of(servers._process_tree(root))


def _postgres_backends(database: str | None) -> list[int]:
    """The Postgres backends serving one database: their work is our service's, not others'."""
    if not database:
        return []
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                cmdline = (entry / "cmdline").read_bytes()
                if cmdline.startswith(b"postgres: ") and f" {database} ".encode() in cmdline:
                    pids.append(int(entry.name))
    return pids


def _machine_busy_seconds() -> float:
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait


class _OtherLoad:
    """CPU that machine-wide use shows but the processes of this scenario do not account for.

    The harness samples other work only before a scenario starts; work that starts during the
    rounds skews them just as much, so this measures it over the rounds themselves.
    """

    def __init__(self, roots: list[int], database: str | None) -> None:
        self.roots, self.database = roots, database

    def _ours(self) -> float:
        pids = sorted({pid for root in self.roots for pid in servers._process_tree(root)})
        return _cpu_of(pids) + _cpu_of(_postgres_backends(self.database))

    def __enter__(self) -> _OtherLoad:
        self.t0, self.busy0, self.ours0 = time.monotonic(), _machine_busy_seconds(), self._ours()
        self.cores = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        busy = _machine_busy_seconds() - self.busy0
        ours = self._ours() - self.ours0
        self.cores = round(max(0.0, busy - ours) / max(1e-9, time.monotonic() - self.t0), 2)


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@contextlib.contextmanager
def _litellm(workdir: Path, exe: Path, sim_url: str) -> Iterator[_Proxy]:
    port = servers.free_port()
    config = workdir / f"litellm-{port}.yaml"
    config.write_text(litellm_config(sim_url))
    log_path = workdir / f"litellm-{port}.log"
    # A clean environment: LiteLLM reads DATABASE_URL, REDIS_*, provider keys and more from it.
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", str(workdir)),
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        # The bundled cost map, not a download at start-up (only loopback traffic here).
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    }
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [str(exe), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)],
            cwd=workdir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    proxy = _Proxy(f"http://127.0.0.1:{port}", proc, log_path)
    try:
        deadline = time.monotonic() + LITELLM_START_TIMEOUT_S
        with httpx.Client(timeout=5.0) as client:
            while True:
                if proc.poll() is not None:
                    raise LiteLLMUnavailable(
                        f"litellm exited with {proc.returncode}:\n{proxy.log_tail()}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{proxy.base_url}/health/liveliness").status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise LiteLLMUnavailable(
                        f"litellm not ready after {LITELLM_START_TIMEOUT_S} s:\n{proxy.log_tail()}"
                    )
                time.sleep(0.5)
        yield proxy
    finally:
        _stop_group(proc)


# --- Checks and measurement -----------------------------------------------------------------


async def stream_check(base_url: str, params: dict[str, Any]) -> Result:
    """One raw streaming call: the named SSE events that came back and the input tokens counted.

    The simulator counts input tokens from the request's text, so equal counts direct and through
    LiteLLM show the proxy forwarded the same prompt (system, tools, message).
    """
    events: list[str] = []
    input_tokens: int | None = None
    text_deltas = 0
    headers = {"x-api-key": API_KEY, "anthropic-version": "2023-06-01"}
    async with (
        httpx.AsyncClient(timeout=30.0) as client,
        client.stream(
            "POST", f"{base_url}/v1/messages", json={**params, "stream": True}, headers=headers
        ) as resp,
    ):
        if resp.status_code != 200:
            body = (await resp.aread()).decode(errors="replace")[:300]
            return {"status": resp.status_code, "error": body}
        event = ""
        async for line in resp.aiter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
                if event not in events:
                    events.append(event)
            elif line.startswith("data:") and event:
                data = json.loads(line[5:])
                if event == "message_start":
                    input_tokens = data["message"]["usage"]["input_tokens"]
                elif event == "content_block_delta" and data["delta"]["type"] == "text_delta":
                    text_deltas += 1
    return {
        "status": 200,
        "content_type": resp.headers.get("content-type", ""),
        "events": events,
        "input_tokens": input_tokens,
        "text_deltas": text_deltas,
    }


def summarize(samples: dict[str, list[float]]) -> dict[str, Result]:
    """Per path: TTFT percentiles; for every path but direct, the difference and ratio to it."""
    direct = percentiles(samples.get("direct", []))
    out: dict[str, Result] = {}
    for path, values in samples.items():
        pct = percentiles(values)
        entry: Result = {"ttft_ms": pct, "samples": len(values)}
        if path != "direct":
            shared = [p for p in PERCENTILES if p in pct and p in direct]
            entry["overhead_ms"] = {p: round(pct[p] - direct[p], 3) for p in shared}
            entry["ratio_to_direct"] = {
                p: round(pct[p] / direct[p], 4) for p in shared if direct[p] > 0
            }
        out[path] = entry
    return out


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


async def _measure(
    server: Server, sim: _Simulator, proxy: _Proxy | None, litellm: Result
) -> Result:
    params = _direct_params()
    paths = [p for p in PATHS if p != "litellm" or proxy is not None]
    checks: Result = {"direct": await stream_check(sim.base_url, params)}
    if proxy is not None:
        checks["litellm"] = await stream_check(proxy.base_url, params)
        if checks["litellm"].get("status") != 200 or not checks["litellm"].get("text_deltas"):
            # It started but does not stream Anthropic messages back: a finding, not a number.
            litellm["status"] = "does not stream /v1/messages"
            litellm["reason"] = json.dumps(checks["litellm"])[:500]
            paths.remove("litellm")
    direct_events = checks["direct"].get("events")
    if "litellm" in paths:
        litellm["same_events_as_direct"] = checks["litellm"].get("events") == direct_events
        litellm["same_input_tokens_as_direct"] = checks["litellm"].get("input_tokens") == checks[
            "direct"
        ].get("input_tokens")

    async with _client(max(CONCURRENCY)) as client:
        urls = {"direct": sim.base_url, "litellm": proxy.base_url if proxy else ""}

        def round_for(path: str, n: int) -> Callable[[], Awaitable[Any]]:
            if path == "ours":
                return lambda: _service_round(client, server, n)
            return lambda: _direct_round(urls[path], n, params)

        warmup: list[str] = []
        for path in paths:  # connection pools, first calls, lazy imports: not measured
            await _guarded(path, round_for(path, WARMUP_REQUESTS), warmup)
        await asyncio.sleep(PAUSE_AFTER_OURS_S)

        cpu0 = {"ours": server.cpu_seconds(), "litellm": proxy.cpu_seconds() if proxy else 0.0}
        requests = {"ours": 0, "litellm": 0}
        levels = []
        # The simulator and both gateways are children of this process, so its tree holds them.
        roots = [os.getpid(), sim.proc.pid, server.pid] + ([proxy.proc.pid] if proxy else [])
        for n in CONCURRENCY:
            samples: dict[str, list[float]] = {p: [] for p in paths}
            errors: dict[str, list[str]] = {p: [] for p in paths}
            with _OtherLoad(roots, server.database) as other:
                for r in range(ROUNDS[n]):
                    for path in paths[r % len(paths) :] + paths[: r % len(paths)]:
                        samples[path] += await _guarded(path, round_for(path, n), errors[path])
                        requests[path] = requests.get(path, 0) + n
                        await asyncio.sleep(PAUSE_AFTER_OURS_S if path == "ours" else PAUSE_S)
            level: Result = {
                "concurrency": n,
                "rounds": ROUNDS[n],
                "paths": summarize(samples),
                # Cores busy with work outside this scenario while the level ran.
                "other_cpu_cores": other.cores,
            }
            for path in paths:
                level["paths"][path]["errors"] = len(errors[path])
                level["paths"][path]["error_kinds"] = _summarize_errors(errors[path])
            levels.append(level)
            print(f"  gateway: {level_line(level)}", flush=True)
        cpu = {
            "ours": server.cpu_seconds() - cpu0["ours"],
            "litellm": proxy.cpu_seconds() - cpu0["litellm"] if proxy else 0.0,
        }

    resources: Result = {
        "ours": {
            "rss_mb": round(server.rss_bytes() / MB, 1),
            "cpu_ms_per_request": round(cpu["ours"] * 1000 / max(1, requests["ours"]), 2),
        }
    }
    if "litellm" in paths and proxy is not None:
        resources["litellm"] = {
            "rss_mb": round(proxy.rss_bytes() / MB, 1),
            "cpu_ms_per_request": round(cpu["litellm"] * 1000 / max(1, requests["litellm"]), 2),
        }
    measured_ok = all(
        level["paths"][p]["errors"] == 0 and level["paths"][p]["samples"] > 0
        for level in levels
        for p in ("direct", "ours")
    )
    return {
        "levels": levels,
        "paths": paths,
        "stream_checks": checks,
        "resources": resources,
        "warmup_errors": _summarize_errors(warmup),
        "errors": sum(level["paths"][p]["errors"] for level in levels for p in paths),
        # Ours and direct must be clean; LiteLLM's own failures are findings about it.
        "ok": measured_ok,
    }


def level_line(level: Result) -> str:
    parts = []
    for path in PATHS:
        entry = level["paths"].get(path)
        if entry is None:
            continue
        t = entry["ttft_ms"]
        ratio = entry.get("ratio_to_direct", {})
        parts.append(
            f"{path} p50 {t.get('p50')} / p99 {t.get('p99')} ms"
            + (f" ({ratio.get('p50')}x / {ratio.get('p99')}x)" if ratio else "")
            + (f" [{entry['errors']} errors]" if entry.get("errors") else "")
        )
    other = level.get("other_cpu_cores")
    return (
        f"c={level['concurrency']}: "
        + "; ".join(parts)
        + (f" (other work: {other} cores)" if other else "")
    )


def summary_line(res: Result) -> str:
    """One line for `python -m benchmarks`' progress output."""
    lines = [level_line(level) for level in res["levels"]]
    if res["litellm"].get("status") != "ok":
        lines.append(f"LiteLLM: {res['litellm'].get('status')}")
    return " | ".join(lines)


def gateway(workdir: Path, cfg: Config) -> Result:
    litellm: Result = {
        "version": LITELLM_VERSION,
        "endpoint": "/v1/messages",
        "workers": 1,  # its default, like our single `chatops serve` process
        "status": "ok",
    }
    base: Result = {
        "concurrency": list(CONCURRENCY),
        "rounds": {str(n): r for n, r in ROUNDS.items()},
        "simulator": {"ttft_ms": SIM_TTFT_MS, "tokens_per_s": SIM_TOKENS_PER_S},
        "client": f"anthropic {_version('anthropic')} (AsyncAnthropic, messages.stream)",
        "litellm": litellm,
    }
    try:
        exe: Path | None = ensure_litellm()
    except (LiteLLMUnavailable, OSError, subprocess.SubprocessError) as exc:
        exe = None
        litellm.update(status="not installed", reason=str(exc))
    with contextlib.ExitStack() as stack:
        sim = stack.enter_context(_simulator(workdir, SIM_TTFT_MS, SIM_TOKENS_PER_S))
        proxy: _Proxy | None = None
        if exe is not None:
            litellm["config"] = litellm_config(sim.base_url)
            try:
                proxy = stack.enter_context(_litellm(workdir, exe, sim.base_url))
            except LiteLLMUnavailable as exc:
                litellm.update(status="did not start", reason=str(exc)[-1500:])
        server = stack.enter_context(
            _ours(workdir, ANTHROPIC_API_KEY=API_KEY, ANTHROPIC_BASE_URL=sim.base_url)
        )
        try:
            return base | asyncio.run(_measure(server, sim, proxy, litellm))
        except Exception:
            return base | {
                "error": traceback.format_exc(limit=3),
                "server_log_tail": server.log_tail(),
                "simulator_log_tail": sim.log_tail(),
                "litellm_log_tail": proxy.log_tail() if proxy else "",
            }


RUNNERS: dict[str, Callable[[Path, Config], Result]] = {"gateway": gateway}
