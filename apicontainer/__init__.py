"""
api-container: one HTTP write, delivered to every configured store or to none.
"""

__version__ = "0.1.0"
