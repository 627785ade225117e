"""What evaluate.py checks before any work: the --model specs resolved to model folders (a diffusers folder, a
train.py checkpoint over its base, a LoRA export over its base, or the toy world), each of their files checked from
headers and sizes (nothing loaded), the flags that reach torch and diffusers, and the sizes against each model.
A problem is one line; under torchrun every rank stops together and rank 0 says it (launch/collectives.py).
"""
import json
import math
from dataclasses import dataclass
from pathlib import Path

from launch import collectives, run_folder
from policy.families import family_of, folder_problem
from policy.lora import WEIGHTS as LORA_WEIGHTS, base_of, is_lora_folder
from policy.weights import safetensors_problem

WHO = "evaluate.py"


@dataclass
class ModelRef:
    name: str
    folder: Path  # diffusers folder of a supported family (policy/families.py)
    checkpoint: Path = None  # train.py DCP checkpoint read over the folder's transformer
    toy: bool = False
    lora: Path = None  # a LoRA adapter folder (diffusers format) loaded onto the folder's transformer
    lora_args: dict = None  # a LoRA run's settings, for its DCP checkpoints (adapter weights only)


def resolve_model(spec: str, base: str = "") -> ModelRef:
    if spec in ("", "toy"):
        import toy
        return ModelRef("toy-base", Path(toy.base_model()), None, True)
    p = Path(spec)
    if (p / ".metadata").is_file():  # a torch.distributed.checkpoint folder written by train.py
        args = p.parent / "args.json"
        try:
            run = json.loads(args.read_text()) if args.is_file() else {}
        except ValueError:
            if not base:
                raise SystemExit(f"evaluate.py: checkpoint {p}: {args} is damaged (not JSON): pass --base "
                                 "MODEL_FOLDER") from None
            run = {}
        under = base or (run.get("model", "") if args.is_file() else None)
        if under is None:
            raise SystemExit(f"evaluate.py: checkpoint {p} has no {args} naming its base model: pass --base")
        ref = resolve_model(under or "toy")
        lora_run = run if run.get("lora_rank") else None
        return ModelRef(f"{p.parent.name}-{p.name}", ref.folder, p, ref.toy, lora_args=lora_run)
    if is_lora_folder(p):  # train.py --lora-rank's export: the base model + this adapter
        try:
            under = base or base_of(p)
        except ValueError:
            raise SystemExit(f"evaluate.py: adapter {p}: lora.json is damaged (not JSON): pass --base "
                             "MODEL_FOLDER") from None
        if not under:
            raise SystemExit(f"evaluate.py: adapter {p} names no base model (lora.json): pass --base MODEL_FOLDER")
        ref = resolve_model(under)
        return ModelRef(f"{p.parent.name}-{p.name}" if p.name == "final" else p.name, ref.folder, None, ref.toy, p)
    if (p / "model_index.json").is_file():
        return ModelRef(f"{p.parent.name}-{p.name}" if p.name == "final" else p.name, p, None,
                        (p / "toy.json").is_file())
    if list(p.glob("*.distcp")):
        raise SystemExit(f"evaluate.py: --model {spec}: a checkpoint without its .metadata (written last: the save was "
                         "cut short): evaluate another checkpoint of the run")
    hint = " (a train.py output: pass its final/ or one of its ckpt_*/ folders)" if (p / "args.json").is_file() else ""
    raise SystemExit(f"evaluate.py: --model {spec}: not a diffusers model folder (model_index.json) nor a "
                     f"train.py checkpoint (.metadata){hint}")


def model_problem(ref: ModelRef) -> str:
    """'' when every file evaluating `ref` reads is whole, else one line naming the file and what is wrong (read
    from the files' headers and sizes; nothing is loaded): the checkpoint, the adapter, the model folder."""
    if ref.checkpoint and (why := run_folder.shards_problem(ref.checkpoint)):
        return f"checkpoint {ref.checkpoint}: {why}"
    if ref.lora and (why := safetensors_problem(ref.lora / LORA_WEIGHTS)):
        return f"adapter {ref.lora}: {LORA_WEIGHTS}: {why}"
    if why := folder_problem(ref.folder):
        return f"{'base model' if ref.checkpoint or ref.lora else 'model folder'} {ref.folder}: {why}"
    return ""


def one_line(fn, *args):
    """(fn(*args), None), or (None, its line) when fn stops with SystemExit("evaluate.py: ..."): for
    collectives.stop_if_any, which stops every rank when any has a line (rank 0 says the first)."""
    try:
        return fn(*args), None
    except SystemExit as e:
        if not isinstance(e.code, str):
            raise
        return None, e.code.removeprefix(f"{WHO}: ")


def resolve_models(a, rank: int, world: int) -> list:
    """The models, named, each of its files checked (model_problem) on every rank before any work: a problem stops
    every rank, and rank 0 says it in one line."""
    def resolve():
        refs = [resolve_model(s, a.base) for s in a.model or ["toy"]]
        if a.names:
            if len(a.names) != len(refs):
                raise SystemExit(f"evaluate.py: {len(refs)} models but {len(a.names)} --names")
            for r, n in zip(refs, a.names):
                r.name = n
        if len({r.name for r in refs}) < len(refs):
            raise SystemExit(f"evaluate.py: two models are named alike {[r.name for r in refs]}: give --names")
        for r in refs:
            if why := model_problem(r):
                raise SystemExit(f"evaluate.py: model {r.name}: {why}")
        return refs
    refs, error = one_line(resolve) if rank == 0 else (None, None)  # rank 0 first: it pretrains the toy model once
    collectives.stop_if_any(error, WHO)
    if rank != 0:
        refs, error = one_line(resolve)
    collectives.stop_if_any(error, WHO)
    return refs


def arg_errors(a) -> list:
    """The flags that reach torch and diffusers, checked before any work (the sizes against each model: size_errors)."""
    errors = [f"--{k.replace('_', '-')} {v}: must be >= {low}" for k, v, low in (
        ("steps", a.steps, 1), ("per_prompt", a.per_prompt, 0), ("batch_size", a.batch_size, 0),
        ("height", a.height, 0), ("width", a.width, 0), ("grid_prompts", a.grid_prompts, 0)) if v < low]
    errors += [f"--dtype {a.dtype}: bf16 or fp32 (empty: bf16 on cuda, fp32 on cpu)"] * (a.dtype not in ("", "bf16", "fp32"))
    errors += [f"--device {a.device}: cuda or cpu (empty: cuda if available)"] * (a.device not in ("", "cpu", "cuda"))
    errors += [f"--shift {a.shift}: must be a finite number > 0 (0: the model family's)"] * (
        not (math.isfinite(a.shift) and a.shift >= 0))
    errors += [f"--guidance {a.guidance}: must be a finite number >= 0 (0: the model family's)"] * (
        not (math.isfinite(a.guidance) and a.guidance >= 0))
    errors += [f"--collective-timeout {a.collective_timeout}: minutes, >= 1"] * (
        not (math.isfinite(a.collective_timeout) and a.collective_timeout >= 1))
    return errors


def size_errors(a, refs: list):
    """--height / --width against each model's latent multiple (its family's size_multiple: 16 for FLUX.1), then the
    options each model would run with (its g2rpo.json: Policy.options); None if fine. Nothing is loaded."""
    for ref in refs:
        family = family_of(ref.folder)
        m = family.size_multiple(ref.folder)
        for flag, v in (("height", a.height), ("width", a.width)):
            if v % m:
                return f"--{flag} {v}: must be a multiple of {m} for {ref.name} (2x2 patches of its latent cells)"
        try:
            family.options(ref.folder, height=a.height, width=a.width, guidance=a.guidance)
        except ValueError as e:
            return f"{ref.name}: {e}"
    return None
