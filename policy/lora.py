"""LoRA adapters on a family's transformer (peft, through diffusers' own adapter support).

    W x  ->  W x + (alpha / r) B A x        W frozen (bf16 under --mixed-precision bf16), A, B trained in fp32

B starts at zero, so the adapted policy starts as the base policy: the first rollout and the first
re-scoring are the base model's, exactly as in full fine-tuning. The export is diffusers' LoRA format
(pytorch_lora_weights.safetensors, with the adapter's rank and alpha in its metadata), written by the family's
pipeline class (FluxPipeline, StableDiffusion3Pipeline, QwenImagePipeline) so that its load_lora_weights reads it;
lora.json beside it names the base model folder.

The default targets are each family's LORA_TARGETS (policy/flux.py, sd3.py, qwen_image.py): those of diffusers'
DreamBooth-LoRA script for that family.
"""
import json
import re
from contextlib import contextmanager
from pathlib import Path

import torch

WEIGHTS = "pytorch_lora_weights.safetensors"


def lora_config(rank: int, alpha: float, targets):
    """peft LoraConfig; alpha 0 means alpha = rank (scale 1)."""
    from peft import LoraConfig
    return LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=list(targets), init_lora_weights=True)


def add_lora(transformer, rank: int, alpha: float, targets, seed: int = 0):
    """Add an adapter in place: only its A, B matrices train, in float32; every other weight is frozen.
    A's random init comes from `seed` alone, so that every rank of a sharded run builds the same adapter.
    A base on the meta device (train.py builds it there and fills it later, policy.weights.load_transformer) gets
    real adapters all the same, on the CPU, with the values a loaded base gets. Returns the number of trainable
    parameters."""
    with torch.random.fork_rng(devices=[]), _real_stand_ins(transformer):
        torch.manual_seed(seed)
        transformer.add_adapter(lora_config(rank, alpha, targets))
    n = 0
    for name, p in transformer.named_parameters():
        is_lora = ".lora_" in name
        p.requires_grad_(is_lora)
        if is_lora:
            p.data = p.data.float()
            n += p.numel()
    if n == 0:
        raise ValueError(f"LoRA targets {list(targets)} match no module of the transformer")
    return n


@contextmanager
def _real_stand_ins(transformer):
    """peft makes each adapter on the CPU, draws its init, then moves it to the device and dtype of the layer it
    adapts: onto the meta device, the values would be lost. While the adapters are made, each meta weight of a
    linear layer is stood in for by a CPU tensor of its shape and dtype that holds one element (stride 0), so that
    they stay on the CPU, cast to the base's dtype as for a loaded base; the meta weights then return."""
    swapped = [(m, m.weight) for m in transformer.modules()
               if isinstance(m, torch.nn.Linear) and m.weight.is_meta]
    for m, w in swapped:
        m.weight = torch.nn.Parameter(torch.empty((), dtype=w.dtype).expand(w.shape), requires_grad=w.requires_grad)
    try:
        yield
    finally:
        for m, w in swapped:
            m.weight = w


def is_lora_folder(path) -> bool:
    return (Path(path) / WEIGHTS).is_file()


def save_lora(path, state_dict: dict, transformer, base_dir):
    """Write the adapter of `transformer` (its full, unsharded `state_dict`, adapter keys as named in the
    module) to the folder `path` in diffusers' LoRA format; lora.json names `base_dir`. The same adapter and
    settings give the same bytes. Written beside as path.tmp, then swapped in (policy/export_folder.py). The format
    is the base's family's pipeline's (its save_lora_weights)."""
    import diffusers
    from peft.utils import get_peft_model_state_dict
    from policy.export_folder import fresh, sort_headers, swap_in
    from policy.families import family_of
    pipeline = getattr(diffusers, family_of(base_dir).PIPELINE)  # FluxPipeline, StableDiffusion3Pipeline, ...
    tmp = fresh(path)
    layers = get_peft_model_state_dict(transformer, state_dict=state_dict)
    config = transformer.peft_config["default"].to_dict()
    # peft holds target_modules (and may hold others) as a set: JSON wants a list, one order wants it sorted
    config = {k: sorted(v) if isinstance(v, (set, frozenset)) else v for k, v in config.items()}
    pipeline.save_lora_weights(tmp, transformer_lora_layers=layers, transformer_lora_adapter_metadata=config)
    sort_headers(tmp)
    (tmp / "lora.json").write_text(json.dumps({"base": str(Path(base_dir).resolve()), "rank": config["r"],
                                               "alpha": config["lora_alpha"]}, sort_keys=True))
    return swap_in(tmp, path)


def base_of(path) -> str:
    """The base model folder an exported adapter was trained on ('' if not recorded)."""
    meta = Path(path) / "lora.json"
    return json.loads(meta.read_text()).get("base", "") if meta.is_file() else ""


def load_lora(transformer, path):
    """Load an exported adapter into `transformer` (the base model), in the transformer's dtype."""
    transformer.load_lora_adapter(str(path), prefix="transformer", weight_name=WEIGHTS, adapter_name="default")
    return transformer


def trainable(model) -> list:
    """The parameters the optimizer holds: all of them for full fine-tuning, the adapters' under LoRA."""
    return [p for p in model.parameters() if p.requires_grad]


@torch.no_grad()
def adapter_state(transformer) -> dict:
    """{name: tensor} of the adapter weights only (for tests and comparisons)."""
    return {k: v.detach().clone() for k, v in transformer.state_dict().items() if ".lora_" in k}


def target_errors(config: dict, targets, transformer_class) -> list:
    """--lora-targets names that match no linear layer of the transformer of `config` (built on the meta device:
    no memory, no weights), one line for all of them, with the names that would."""
    with torch.device("meta"):
        model = transformer_class.from_config({k: v for k, v in config.items() if k != "_name_or_path"})
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if not missing:
        return []
    known = sorted({re.sub(r"^\w+\.\d+\.", "", n)
                    for n in names})
    return [f"--lora-targets {' '.join(missing)}: no linear layer of the transformer is named so; its layers end in: "
            f"{', '.join(known[:40])}"]
