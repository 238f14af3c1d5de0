"""In-context retrieval-augmented LM (In-Context RALM): a BM25-retrieved train passage prepended
to the window, refreshed every few tokens."""
