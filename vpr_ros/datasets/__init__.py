"""Dataset readers: where images and their place labels come from."""
