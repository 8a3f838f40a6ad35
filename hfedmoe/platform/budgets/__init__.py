"""Client budgets: device profiles and traces, budget drawing, the memory and time model."""
