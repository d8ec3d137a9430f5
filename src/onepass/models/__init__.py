"""Target models: the Backend protocol, the native Llama-family decoder and model loading."""

from onepass.models.base import Backend, ModelOutput

__all__ = ["Backend", "ModelOutput"]
