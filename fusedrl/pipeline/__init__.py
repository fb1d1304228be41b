"""fusedrl.pipeline."""
