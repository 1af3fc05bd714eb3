"""Recipes that build models the product uses, kept outside the ``specvlm_lit`` package (which never imports them)."""
