"""lorabay.serve."""
