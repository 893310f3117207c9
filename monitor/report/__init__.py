"""What people look at: per-case QC figures and the offline report page."""
