"""A local stand-in for the Anthropic Messages API, byte-compatible with what the SDK expects.

The service talks to it when no ANTHROPIC_API_KEY is set (same code path, only `base_url`
differs), and tests and benchmarks use it to get real HTTP, real SSE framing and every failure
mode on demand. Wire-format truth: reference/anthropic-api.md beside the design doc.

Output is a deterministic function of the request, so a test can assert on exact text, and the
request itself chooses behaviour through directives in the last user message text:

    [[tool:NAME {"json": "input"}]]  call tool NAME (must be in `tools`); several directives in
                                     one message are issued one per turn, in order
    [[fault:NAME]] / [[fault:NAME*N]]  inject a fault (always / only the first N attempts of
                                     this exact request body); also header `x-sim-fault: NAME[*N]`
    [[tokens:N]]                     length of the generated text, in tokens
    [[stop:REASON]]                  force the stop reason (end_turn, max_tokens, stop_sequence,
                                     pause_turn, refusal, model_context_window_exceeded)
    [[clock]]                        streamed text deltas begin with `[t:MS]`, the Unix time in
                                     milliseconds at which the simulator sent them, so a reader
                                     downstream can measure its lag from the source (benchmarks)

Faults: rate_limit (429), overloaded (529), server_error (500), invalid_request (400),
auth (401), midstream_error (`event: error` after a few deltas), cut (TCP connection dropped
after a few deltas: the SDK raises `httpx2.RemoteProtocolError` while iterating), truncate (body
ends cleanly after a few deltas with no message_delta/message_stop: the SDK returns a partial
message with `stop_reason=None`), slow (10 s before the first event), stall (message_start,
then silence for 60 s or until the client goes away). Without `"stream": true`, midstream_error
answers 529 and cut/truncate/stall drop the connection before the body is complete.

A final turn whose last user message carries tool_result blocks answers "The tool returned: ..."
with every result of the current tool loop quoted verbatim.

The package, one concern per module: `config` (settings, faults, limits), `request` (parsing
and directives), `cache` (input tokens and the prompt cache), `plan` (the deterministic answer),
`state` (what lasts between requests), `pacing` (the output clock), `streaming` (SSE events and
the paced response), `app` (routes, errors, the app factory) and `server` (running it).
"""

from __future__ import annotations

from streams_service.llm.simulator.app import create_simulator_app
from streams_service.llm.simulator.config import FAULTS, SimulatorConfig
from streams_service.llm.simulator.server import run_simulator, serve_simulator

__all__ = [
    "FAULTS",
    "SimulatorConfig",
    "create_simulator_app",
    "run_simulator",
    "serve_simulator",
]
