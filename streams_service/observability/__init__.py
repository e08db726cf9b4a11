"""Observability (DESIGN §7): structured logs, Sentry, PostHog and Prometheus.

Everything here is configured by the app's lifespan, never at import. Code elsewhere reaches it
through one `Telemetry` object handed to the services; with nothing configured every hook is a
cheap no-op (metrics are always kept: they cost a counter increment).
"""
