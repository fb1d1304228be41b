"""fusedrl.generation."""
