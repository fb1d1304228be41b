"""fusedrl.data."""
