"""word2vec skip-gram embeddings (gensim) as a checkpoint."""
