"""fusedrl.algorithms."""
