"""The outer families; importing this package registers them (models.registry.FAMILIES, PRESETS)."""
from models.families import mar  # noqa: F401  (registration)
from models.families import scalewise  # noqa: F401  (registration)
