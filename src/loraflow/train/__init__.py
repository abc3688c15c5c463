"""Training recipes: thin scripts over the library."""
