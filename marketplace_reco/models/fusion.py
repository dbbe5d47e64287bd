"""Image + text fusion classifier."""
