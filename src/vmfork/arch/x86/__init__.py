"""x86-64: CPU setup, memory layout, boot protocols."""
