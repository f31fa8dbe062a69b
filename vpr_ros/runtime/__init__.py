"""Inference: image preprocessing and Encoder backends behind one interface."""
