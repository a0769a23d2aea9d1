"""Errors a user can act on, and how a message names a setting in the words of its command.

Scripts print a QuickFixError's message on one line and exit non-zero.

A message names a setting, or a stage's command, through a reference (`ref`), never as a flag
written out: the same setting is `--batch-size` to `extract_features.py` and
`--extract-batch-size` to `quickfix-labels`, and "rerun extract_features.py" is `quickfix-labels`
to someone who ran that. The command that reports the message (its error boundary, and its log
handler) renders each reference in its own names (`render`); anywhere else a reference reads as
the stage script's flag.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

# A reference is KEY between these two control characters, which no message otherwise holds.
_OPEN, _CLOSE = "\x1e", "\x1f"
_REF = re.compile(f"{_OPEN}([^{_CLOSE}]*){_CLOSE}")

# What each reference reads as where no command renders it: the stage scripts' own names.
# `pipeline.settings` fills it from the flags it declares; a command's names override it.
SCRIPT_NAMES: dict[str, str] = {
    "cmd.extract": "extract_features.py",
    "cmd.train": "train_head.py",
    "cmd.stitch": "stitch_checkpoint.py",
}


def ref(key: str, value: object = None, *, negate: bool = False) -> str:
    """A setting (`"train.epochs"`, or a shared one: `"device"`) or a stage's command
    (`"cmd.extract"`) named in a message; with `value`, as the flag given that value
    ("--precision fp32"); `negate`: the flag's --no- form."""
    key = f"{key}!no" if negate else key
    text = f"{_OPEN}{key}{_CLOSE}"
    return text if value is None else f"{text} {value}"


def render(text: str, names: Mapping[str, str] | None = None) -> str:
    """`text` with every reference in `names` (a command's), else in the scripts' names."""
    def name(match: re.Match) -> str:
        key, _, negate = match[1].partition("!")
        found = (names or {}).get(key) or SCRIPT_NAMES.get(key) or _fallback(key)
        return f"--no-{found[2:]}" if negate and found.startswith("--") else found

    return _REF.sub(name, text)


def _fallback(key: str) -> str:
    return "--" + key.rpartition(".")[2].replace("_", "-")


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first non-blank line of an exception's message (its class name when it has none)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return (lines[0] if lines else type(exc).__name__)[:limit]


class QuickFixError(Exception):
    """Base class: a problem with the user's inputs, reported without a traceback.

    Its message may hold references (`ref`); `str()` renders them in the scripts' names, the
    error boundary of the command that reports it in that command's (`message`)."""

    exit_code = 2

    @property
    def raw(self) -> str:
        """The message with its references unrendered (what travels between ranks)."""
        return str(self.args[0]) if self.args else ""

    def message(self, names: Mapping[str, str] | None = None) -> str:
        return render(self.raw, names)

    def __str__(self) -> str:
        return self.message()


class CheckpointError(QuickFixError):
    """The checkpoint cannot be read, is not trusted, or does not hold the expected weights."""


class ArchitectureError(QuickFixError):
    """The model architecture cannot be built or does not match the checkpoint."""


class DataError(QuickFixError):
    """The image tree, split list, class order or a setting's value is unusable."""


class StoreError(QuickFixError):
    """The feature store is missing, incomplete, or belongs to other inputs."""


class StoreDamaged(StoreError):
    """A written chunk of the feature store is not what was written there (a checksum, a
    decode, or a non-finite value): stage 1 --verify finds and recomputes it."""


class SetupError(QuickFixError):
    """This machine cannot run what was asked: a library, driver or device does not work."""
