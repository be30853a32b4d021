"""vlkit: CLIP- and BLIP-style vision-language models, from pretraining to few-shot use."""

from vlkit.errors import VlkitError

__version__ = "0.1.0"


def load_model(spec: str, **kwargs):
    """Load a vision-language model by spec; see `vlkit.models.load_model`."""
    from vlkit.models import load_model as _load

    return _load(spec, **kwargs)


__all__ = ["VlkitError", "load_model", "__version__"]
