"""lorabay.train."""
