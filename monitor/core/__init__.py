"""The plugin contract and the core's own plumbing: hook specifications, the plugin manager,
component interfaces, typed events, configuration, atomic writes, progress bars."""
