"""Pure scheduling policies (no torch): inter-stage, intra-stage, plan search."""
