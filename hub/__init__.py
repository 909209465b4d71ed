"""lorabay.hub."""
