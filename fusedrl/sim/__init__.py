"""fusedrl.sim."""
