"""Evaluation harnesses: multiple-choice scoring, text metrics, evaluation by generation."""
