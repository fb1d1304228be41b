"""fusedrl: RLHF (PPO) training with inter-stage fusion, intra-stage fusion and
parameter reallocation. See docs/design.md for the architecture."""

__version__ = "0.1.0"
