"""Dagster wiring only: assets, partitions, jobs and resources that call the domain modules."""
