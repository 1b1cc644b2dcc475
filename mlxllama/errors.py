"""Typed errors. The library raises these; the CLI turns them into one line and exit code 1."""


class MlxllamaError(Exception):
    """Base class for every error that is the user's input, not a bug."""


class ModelNotFoundError(MlxllamaError):
    """A model directory, file or repo id that cannot be found or fetched."""


class ConfigError(MlxllamaError):
    """config.json (or another metadata file) is missing, unreadable or incomplete."""


class WeightsError(MlxllamaError):
    """Weight files that are missing, truncated or disagree with the config."""


class UnsupportedModelError(MlxllamaError):
    """A model type, GGUF tensor type or file format that is not supported."""


class InputError(MlxllamaError):
    """Bad user input: an empty prompt, an out-of-range option, a prompt that is too long."""


class ConversionError(MlxllamaError):
    """The converter could not produce an output model."""


class TrainingError(MlxllamaError):
    """Fine-tuning cannot go on: bad training data, a loss that became NaN, adapters that do not fit."""


class GrammarError(MlxllamaError):
    """A JSON schema, regex or grammar the grammar engine cannot compile (or uses a feature it does
    not support), or an option that cannot be combined with constrained decoding."""


class ChatTemplateError(InputError):
    """A conversation the chat template cannot render: refused by the template or by the rules
    transformers applies (an empty conversation, continue_final_message with a generation prompt)."""
