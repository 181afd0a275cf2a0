"""adlib: robustness and calibration of few-shot nearest-neighbour anomaly detectors."""

__version__ = "0.1.0"
