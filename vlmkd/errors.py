"""Error types: each names the file, the sample and what to do, so a failed job tells its user why."""


class VlmkdError(Exception):
    """Base class of every error vlmkd raises on purpose."""


class DataError(VlmkdError):
    """A data-set manifest, sample or image is unusable."""


class ModelError(VlmkdError):
    """A model directory or recipe cannot be built or loaded."""


class CacheError(VlmkdError):
    """A teacher cache is incomplete, corrupt or does not fit the reader."""


class RecipeError(VlmkdError):
    """A pipeline recipe (YAML) is malformed or asks for something unknown."""
