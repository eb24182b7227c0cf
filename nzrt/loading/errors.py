"""The errors of loading a model: one-line messages that say what to do, shared by the library
(``nzrt.from_pretrained``) and the command line (whose MODEL argument they describe)."""
from __future__ import annotations

MODEL_HELP = ("MODEL is a transformers directory, a .gguf file, a .nzrt checkpoint, "
              "package.module:factory, 'minilm', or nothing for the embedded SmolLM2-135M")


class ModelError(ValueError):
    """A MODEL argument that cannot be loaded; the message says what to do."""


class GGUFError(ModelError):
    """A .gguf file that is truncated or not a valid GGUF file; the message names the file."""
