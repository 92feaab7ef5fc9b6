"""Small shared helpers: errors and exit codes, atomic writes, common CLI flags."""
