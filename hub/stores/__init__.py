"""Registry stores: ``local`` (file://) and ``s3`` (s3://), both implementing ``store.Store``."""
