"""rhbatch: resumable, never-pay-twice batch runs of ComfyUI workflows on RunningHub."""

__version__ = "0.1.0"

import logging as _logging

# Library logging stays silent unless the CLI (--verbose, the run log) attaches a handler.
_logging.getLogger("rhbatch").addHandler(_logging.NullHandler())
