"""Prometheus integration: QC drift metrics fed by the event hooks."""
