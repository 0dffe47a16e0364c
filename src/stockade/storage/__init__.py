"""Blob storage: where stored objects' bytes live, behind the :class:`BlobStore` seam."""
