"""One frozen folder per experiment; each imports only shared code."""
