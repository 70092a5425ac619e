"""Where a run's metrics go: metrics.csv in the run dir, and experiment trackers."""
