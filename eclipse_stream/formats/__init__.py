"""Container formats the pipeline reads and writes besides WebDataset tars."""
