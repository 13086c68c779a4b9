"""Data-side normalization: statistics fitted on the data set itself, before any model sees it."""

from normlab.data.standardize import Standardizer

__all__ = ["Standardizer"]
