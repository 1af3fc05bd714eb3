# The corpus and tiny-target fixtures have one owner, the product's tests/conftest.py: the product's tests
# build a tiny target with this recipe too. Imported here so pytest offers them to the recipe's tests.
from tests.conftest import small_corpus, tiny_target  # noqa: F401
