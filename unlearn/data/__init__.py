"""Prompt sets, target derivation, concept configs and the anchor/target DataModule with its cache."""

# Names are imported on first use: the DataModule pulls in Lightning, and `python -m unlearn.data.prompts`
# must not find its own module imported already.
_EXPORTS = {
    "Concept": "concepts", "ConceptError": "concepts", "load_concept": "concepts",
    "derive_target_prompts": "derive",
    "PromptSetError": "prompts", "load_prompt_set": "prompts",
    "UnlearnDataModule": "datamodule", "CacheMismatchError": "datamodule",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"unlearn.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'unlearn.data' has no attribute {name!r}")
