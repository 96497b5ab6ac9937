"""Stage 3, critic: V(s) trained with BCE on the soft MC values."""
