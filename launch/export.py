"""The trained transformer exported by rank 0: a model folder (policy.flux.save_model_folder), or under LoRA the
adapter in diffusers' LoRA format (policy.lora.save_lora). Every rank takes part in gathering the full state dict;
a failed write stops every rank with one line (launch.collectives.stop_if_any).
"""
import shutil
from pathlib import Path

from launch.collectives import stop_if_any
from report.files import why_not_written


def export(path: Path, model, model_dir: Path, rank: int, lora: bool):
    """The trained transformer as a model folder (policy.flux.save_model_folder), or under LoRA the adapter
    in diffusers' LoRA format (policy.lora.save_lora), at `path`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from policy.flux import save_model_folder
    from policy.lora import save_lora
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                              ignore_frozen_params=lora))
    error = None
    if rank == 0:
        try:
            save_lora(path, sd, model, model_dir) if lora else save_model_folder(path, sd, model.config, model_dir)
        except Exception as e:  # noqa: BLE001 - one line, and every rank stops with it
            shutil.rmtree(path.with_name(path.name + ".tmp"), ignore_errors=True)
            error = f"export to {path} failed: {why_not_written(e, path)}"
    stop_if_any(error, "train.py")
