"""The per-token heads; importing this package registers them (models.registry.HEADS)."""
from models.heads import arinar, diffloss, token_gmm  # noqa: F401  (registration)
