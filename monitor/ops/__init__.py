"""Operations around the method: per-case scoring for services, drift windows and the alert
policy, the promotion gate, and the monitor service (inbox, ledger, alerts, refinement job)."""
