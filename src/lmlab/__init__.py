"""lmlab: a small, hackable PyTorch lab for training and studying language models.

See the README for the two commands (run the main job, run the tests) and DESIGN notes for the layout.
"""

__version__ = "0.1.0"
