from unlearn.models.loading import Components, ModelLoadError, load_components, save_pipeline
from unlearn.models.sampling import generate
from unlearn.models.text import encode_prompts

__all__ = ["Components", "ModelLoadError", "encode_prompts", "generate", "load_components", "save_pipeline"]
