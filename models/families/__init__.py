"""The outer families; importing this package registers them (models.registry.FAMILIES, PRESETS)."""
from models.families import causal, mar, scalewise  # noqa: F401  (registration)
