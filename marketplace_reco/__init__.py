"""marketplace_reco: predict a marketplace listing's category from its photo and text, and serve it."""

__version__ = "0.1.0"
