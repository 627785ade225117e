"""The trained transformer exported by rank 0: a model folder (policy.weights.save_model_folder), or under LoRA the
adapter in diffusers' LoRA format (policy.lora.save_lora). Every rank takes part in gathering the full state dict;
a failed write stops every rank with one line (launch.collectives.stop_if_any).
"""
import shutil
from pathlib import Path

from launch.collectives import stop_if_any
from report.files import why_not_written


def export(path: Path, model, model_dir: Path, rank: int, lora: bool):
    """The trained transformer as a model folder (policy.weights.save_model_folder), or under LoRA the adapter
    in diffusers' LoRA format (policy.lora.save_lora), at `path`; the family is `model_dir`'s."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from policy.families import family_of
    from policy.lora import save_lora
    from policy.weights import save_model_folder
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                              ignore_frozen_params=lora))
    error = None
    if rank == 0:
        try:
            save_lora(path, sd, model, model_dir) if lora else save_model_folder(path, sd, model.config, model_dir,
                                                                                 family_of(model_dir).TRANSFORMER)
        except Exception as e:  # noqa: BLE001 - one line, and every rank stops with it
            shutil.rmtree(path.with_name(path.name + ".tmp"), ignore_errors=True)
            error = f"export to {path} failed: {why_not_written(e, path)}"
    stop_if_any(error, "train.py")
