"""The one exception type of the recipes' input checks."""


class RecipeError(ValueError):
    """A mistake in a recipe's input; the message says what to change (printed as ``error: ...``, exit status 2)."""
