"""timm backbone transfer learning image classifier."""
