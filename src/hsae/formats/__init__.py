"""Other libraries' SAE formats and the Hugging Face hub.

    import hsae.formats as formats
    sae = formats.load("hf://google/gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71")
    formats.import_to_folder("path/to/saelens_folder", "runs/imported")   # an ordinary hsae model folder
    formats.export_model("runs/topk", "saelens", "exports/topk")          # loads with sae_lens.SAE.load_from_disk

Formats: SAELens (saelens), EleutherAI sparsify (sparsify), dictionary_learning (dictionary_learning)
and Gemma Scope (gemma_scope); `detect_format` tells which a path holds. docs/formats.md says what
maps to what and what is refused.
"""

from hsae.formats.convert import Exported, Imported, export_model, import_sae, import_to_folder, load
from hsae.formats.detect import FORMATS, HSAE, detect_format
from hsae.formats.hub import is_hub_name, parse_hub_name, resolve

__all__ = [
    "FORMATS",
    "HSAE",
    "Exported",
    "Imported",
    "detect_format",
    "export_model",
    "import_sae",
    "import_to_folder",
    "is_hub_name",
    "load",
    "parse_hub_name",
    "resolve",
]
