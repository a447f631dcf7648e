"""Small shared helpers (console output, atomic files, seeding)."""
