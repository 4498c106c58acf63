"""Helpers of the recipes (pretrain.py, sft.py, dpo.py, chain.py), one module per concern:

- `args`: the dataclass arguments, `parse_args` (TrlParser with a checked YAML config and one-line errors), the
  recipes' training defaults (CPU and GPU) and the range checks of numeric flags;
- `data`: the embedded default, local files or a Hub dataset, with the column checks;
- `models`: tokenizer, a fresh model sized by flags, a pre-trained model, the SFT/DPO starting point;
- `output_dir`: what may be done with ``--output_dir`` (new run, resume, replace) and replacing a run safely;
- `evaluation`: the held-out figures (perplexity, greedy exact match, completion log-probabilities);
- `card`: the model card, and saving the final model, tokenizer and results;
- `run`: the entry point (``error: ...`` and exit status 2 for a `RecipeError`) and the recipes' callbacks.

Every user mistake raises `RecipeError` with one message that says what to change, before anything is written.
"""

from .errors import RecipeError

__all__ = ["RecipeError"]
