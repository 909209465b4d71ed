"""lorabay.cli."""
