"""Target models: the Backend protocol, the native Llama-family decoder and model loading."""

from onepass.models.base import Backend, ModelOutput, Rows

__all__ = ["Backend", "ModelOutput", "Rows"]
