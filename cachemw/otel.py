"""OpenTelemetry's public home: ``cachemw.otel.instrument(cache)``, or ``otel = true`` in cachemw's settings.

Needs the ``otel`` extra (``pip install 'cachemw[otel]'``); the rest of cachemw runs without it.
"""

try:
    from cachemw.observe.otel import SPAN_KINDS, instrument
except ImportError as exc:
    if exc.name is None or not exc.name.startswith("opentelemetry"):
        raise
    raise ImportError("cachemw.otel needs the OpenTelemetry API. HINT: pip install 'cachemw[otel]'") from exc

__all__ = ["SPAN_KINDS", "instrument"]
