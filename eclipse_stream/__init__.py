"""eclipse-stream: ECLIPSE purification of poisoned image data as a WebDataset/FFCV pipeline stage."""

__version__ = "0.1.0"
