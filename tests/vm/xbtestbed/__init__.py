"""Host side of the xenbackup VM test bed: build the image, boot it, collect results."""
