"""fusedrl.realloc."""
