"""The errors a user causes, at the bottom of the package map: every module may raise them, and
every entry point reports them in one line naming the file or key and the fix, exit code 2, no
traceback (`USER_ERRORS`). Any other exception is a bug in pmss_dist and keeps its traceback."""


class ConfigError(ValueError):
    """A config key, override or command-line value that cannot be used."""


class HFCheckpointError(ConfigError):
    """An HF checkpoint directory that cannot be used as it is (its config.json, index or weight
    files), named with the fix. A ConfigError: the fix is to the checkpoint that model.path (or a
    tool's --model or --hf) names."""


class DataError(ValueError):
    """Training or evaluation data that cannot be used (a malformed row names its file:line)."""


class TokenizerError(ValueError):
    """A text the tokenizer or the chat template refuses: a row's fault."""


class ChatTemplateError(DataError):
    """A chat template that cannot be used: it does not compile, or a render exceeds its limits.
    The template's fault, not a row's: never reported or skipped as a malformed row (a
    conversation the template refuses or fails on is a row's `TokenizerError`)."""


class SelectionError(ValueError):
    """Bad input to selection: a base weight that is not finite, a selection file that is not
    what this run needs. One line naming the weight, or the file and the layer."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, or cannot be used by this run; the message says why and
    what to do."""


class RunDirError(RuntimeError):
    """The run directory cannot be used (it overlaps the base, or another run holds it)."""


class DivergenceError(RuntimeError):
    """Training diverged; the message names the step and the newest good checkpoint (its usual
    cause is the config: the learning rate, or the data)."""


class OutputPathError(ValueError):
    """An output path that is not ours to write: a device, a FIFO, a file where a directory goes,
    or an input of the same command."""


class ExportError(ValueError):
    """An adapter, checkpoint or base that cannot be exported as asked."""


USER_ERRORS = (ConfigError, DataError, TokenizerError, SelectionError, CheckpointError, RunDirError, DivergenceError,
               OutputPathError, ExportError)
