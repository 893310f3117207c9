"""Prometheus integration: per-service QC-drift and HTTP metrics, fed only by the event hooks
(:mod:`~qcloop.plugins.prometheus.exporter` is the plugin)."""
