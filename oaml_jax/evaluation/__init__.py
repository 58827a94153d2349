"""Evaluation: verification metrics, score fusion, the `.bin` pair protocol, IJB-B/C, plots, eval.py."""
