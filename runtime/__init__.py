"""Lean runtime: loads AOT artifacts and sharded weights and generates (runtime issue). Imports no compiler code."""
