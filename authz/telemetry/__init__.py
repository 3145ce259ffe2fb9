"""OpenTelemetry for the gateway: metrics (OTLP push, Prometheus pull), traces, and the relay of
Claude Code's own telemetry. Imports nothing of the request path: it is handed usage rows and
plain values (:class:`~authz.telemetry.runtime.Telemetry`)."""
