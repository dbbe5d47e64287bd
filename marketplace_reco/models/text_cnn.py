"""Text CNN over word2vec embeddings."""
