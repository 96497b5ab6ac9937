"""Stage 1, generate: K samples per training problem, verified; M kept, correct and wrong balanced."""
