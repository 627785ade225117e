"""Which family a model folder is, read from its model_index.json, and the one place that lists them.

    pipeline (model_index.json _class_name)     family file             base models
    StableDiffusion3Pipeline                    policy/sd3.py           Stable Diffusion 3.5 Medium / Large
    FluxPipeline                                policy/flux.py          FLUX.1 [dev] (the paper's), the toy model
    QwenImagePipeline                           policy/qwen_image.py    Qwen-Image

A fourth family: one file with a Policy subclass (policy/interface.py), and one line in FAMILIES.
"""
import importlib
import json
from pathlib import Path

FAMILIES = {  # pipeline class name -> "module:Policy subclass", imported on first use
    "FluxPipeline": "policy.flux:FluxPolicy",
    "StableDiffusion3Pipeline": "policy.sd3:SD3Policy",
    "QwenImagePipeline": "policy.qwen_image:QwenImagePolicy",
}


def family_problem(root) -> str:
    """'' when `root`'s model_index.json names a supported pipeline, else why not (one line, naming those that are)."""
    index = Path(root) / "model_index.json"
    if not index.is_file():
        return f"not a diffusers model folder ({'no model_index.json' if Path(root).is_dir() else 'it does not exist'}" \
               f"): give the folder a pipeline's save_pretrained writes ({', '.join(FAMILIES)}), e.g. FLUX.1-dev"
    try:
        name = json.loads(index.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError) as e:
        return f"model_index.json is not a diffusers index ({e})"
    if name not in FAMILIES:
        return f"is a {name or 'model_index.json without _class_name'} folder; supported: {', '.join(FAMILIES)} " \
               "(a new family is one file in policy/: see policy/interface.py)"
    return ""


def family_of(root):
    """The Policy subclass of the folder `root`; a clear error for an unsupported one."""
    if why := family_problem(root):
        raise ValueError(f"model folder {root} {why}")
    name = json.loads((Path(root) / "model_index.json").read_text())["_class_name"]
    module, cls = FAMILIES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def folder_problem(root) -> str:
    """'' when `root` is a folder of a supported family that loads, else what is wrong with it."""
    return family_problem(root) or family_of(root).folder_problem(root)


def load(root, **kw):
    """The policy of the folder `root`: its family's from_pretrained(root, **kw)."""
    return family_of(root).from_pretrained(root, **kw)


def transformer_config(root) -> dict:
    return json.loads((Path(root) / "transformer" / "config.json").read_text())
