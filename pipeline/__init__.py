"""rhbatch: resumable, never-pay-twice batch runs of ComfyUI workflows on RunningHub."""

__version__ = "0.1.0"
