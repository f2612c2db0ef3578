"""Evaluation harnesses: multiple-choice scoring (`choice`, with `calibration`), text
metrics (`text`), evaluation by generation (`generation`)."""
