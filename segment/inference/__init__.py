"""Inference: sliding-window / overlap-tile prediction and the Predictor that maps labels back to the scan's geometry."""
