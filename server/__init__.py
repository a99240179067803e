"""The coordinator: the Flower ServerApp, adapter aggregation, the run's records."""
