"""fusedrl.runtime."""
