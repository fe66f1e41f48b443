"""The small, non-kernel pieces of the seed methods: weight schedules (more in later releases)."""

from .schedules import AnnealedWeight

__all__ = ["AnnealedWeight"]
