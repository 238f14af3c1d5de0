"""kNN-LM: a faiss datastore of (hidden state → next token) mixed with the base at every token."""
