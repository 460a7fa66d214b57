"""What the terminal shows: our progress, results, warnings and errors (design.md §2.2).

Third-party libraries speak through :mod:`logging` and :mod:`warnings`. Once the command line calls
:func:`install`, their records go to the command's log file while :func:`log_to` names one, and reach the
terminal only when they are not known to be expected: a load report that :func:`clip_dro.models.build_model`
makes inevitable tells the user nothing, a missing weight does. Library users keep their own logging set-up:
nothing here acts before :func:`install`.
"""
from __future__ import annotations

import logging
import re
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

OUR_PACKAGES = ("clip_dro", "data_prep")
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Load-report statuses that mean a weight the model needs was not loaded as it is in the file.
_HARMFUL_STATUSES = ("MISSING", "MISMATCH", "CONVERSION")
_STYLING = re.compile(r"\x1b\[[0-9;]*m")  # terminal colours (transformers' report), not for a file


def _ours(record: logging.LogRecord) -> bool:
    return record.name.split(".")[0] in OUR_PACKAGES


def expected(record: logging.LogRecord) -> bool:
    """Third-party records that our own code makes inevitable:

    * open_clip's "Model X initialized partially." / "... initialized randomly.": ``build_model`` loads the
      towers' or the whole model's weights itself once open_clip has built the model;
    * a transformers LOAD REPORT that lists only UNEXPECTED keys: weights in the file that the tower does not
      use (BERT's pooler, which a mean-pooling CLIP tower never calls). MISSING or mismatched ones are not.
    """
    message = record.getMessage()
    if record.name == "root" and Path(record.pathname).parent.name == "open_clip":
        return message.endswith(("initialized partially.", "Model initialized randomly."))
    if record.name.startswith("transformers") and "LOAD REPORT" in message:
        return not any(status in message for status in _HARMFUL_STATUSES)
    return False


class _Router(logging.Handler):
    """On the root logger: our records to stderr as plain lines; third-party ones to the log file (when one is
    named) and, from warnings up and unless expected, to stderr under their logger's name."""

    def __init__(self) -> None:
        super().__init__()
        self.log_file: Optional[Path] = None
        self.file_formatter = logging.Formatter(FILE_FORMAT)
        self.terminal_formatter = logging.Formatter(logging.BASIC_FORMAT)

    def emit(self, record: logging.LogRecord) -> None:
        if _ours(record):
            print(record.getMessage(), file=sys.stderr)
            return
        if self.log_file is not None:
            self._append(record)
        if record.levelno >= logging.WARNING and not expected(record):
            print(self.terminal_formatter.format(record), file=sys.stderr)

    def _append(self, record: logging.LogRecord) -> None:
        try:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            with self.log_file.open("a", encoding="utf-8") as f:
                f.write(_STYLING.sub("", self.file_formatter.format(record)) + "\n")
        except OSError:
            pass  # the log is a record for later, never a reason for a run to fail


_router: Optional[_Router] = None


def install() -> None:
    """Route log records as the module says (idempotent); called once by the command line."""
    global _router
    if _router is None:
        _router = _Router()
        # A handler on the root logger also keeps open_clip's bare logging.warning(...) from calling
        # logging.basicConfig, which would print every later warning of every library.
        logging.getLogger().addHandler(_router)
    from PIL import Image

    # Prep and evaluation accept images up to twice PIL's pixel limit (beyond, PIL raises and the image is
    # rejected or skipped); the warning below that says nothing the outcome does not.
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    if "transformers" in sys.modules:
        route_transformers()


def route_transformers() -> None:
    """Once :func:`install` ran: transformers' records through the router instead of its own stderr handler,
    and no progress bar for reading local weights (a fraction of a second). Called where our code is about to
    build a transformers model, so that a command without one never imports transformers."""
    if _router is None:
        return
    from transformers.utils import logging as hf_logging

    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    hf_logging.disable_progress_bar()


@contextmanager
def log_to(path: Optional[Path]) -> Iterator[None]:
    """Third-party records of the block go to ``path`` (appended; created on the first record); None: to no
    file."""
    if _router is None:
        yield
        return
    previous, _router.log_file = _router.log_file, path
    try:
        yield
    finally:
        _router.log_file = previous
