"""The data layer: the users' database and photo bucket in, clean labelled products and photos out.

See docs/ARCHITECTURE.md for the modules and the ``Marketplace`` contract.
"""
